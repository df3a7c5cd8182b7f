"""aiohttp's client behind the interface of lalo's own upstream client, for the benchmark.

`python bench/aiohttp_upstream.py up ...` runs `lalo up ...` with the proxy's upstream pool
swapped for this one, so `bench/proxy_overhead.py --upstream-clients ours,aiohttp` can measure
both clients on the same models in one interleaved run. Not part of lalo: the proxy keeps its
own client unless this comparison says aiohttp's is clearly better.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.proxy import upstream
from launcher.proxy.upstream import (
    UpstreamBroken,
    UpstreamClosed,
    UpstreamTimeout,
    UpstreamUnavailable,
    check_target,
)


class AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers = [(bytes(k), bytes(v)) for k, v in response.raw_headers]
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.content.iter_any():
                yield data
        except TimeoutError as exc:
            raise UpstreamTimeout("the model server went silent for too long") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise UpstreamClosed("the model server closed the connection") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(str(exc)) from exc
        self._done = True

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        if self._done:
            self._response.release()
        else:
            self._response.close()


class AiohttpPool:
    """Same constructor and `request()` as `launcher.proxy.upstream.UpstreamPool`."""

    def __init__(self, keepalive_expiry: float = 4.0, max_idle_per_server: int = 64,
                 connect_timeout: float = 10.0) -> None:
        self.keepalive_expiry = keepalive_expiry
        self.connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self.keepalive_expiry,
                                             use_dns_cache=False)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def request(self, method: str, host: str, port: int, target: str,
                      headers: Sequence[tuple[bytes, bytes]], body: bytes,
                      read_timeout: float, tls: object = None) -> AiohttpResponse:
        """As UpstreamPool.request; `tls` (an https peer) is not part of this comparison."""
        if tls is not None:
            raise NotImplementedError("the aiohttp comparison client speaks plain http only")
        check_target(target)
        url = URL(f"http://{host}:{port}{target}", encoded=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                        sock_read=read_timeout)
        fields = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        for attempt in (1, 2):
            try:
                response = await self._client().request(method, url, data=body,
                                                         timeout=timeout, headers=fields)
            except aiohttp.ClientConnectorError as exc:
                raise UpstreamUnavailable(f"cannot connect to {host}:{port}: {exc}") from exc
            except TimeoutError as exc:
                raise UpstreamTimeout("no answer from the model server in time") from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # as lalo's own client does: a kept-alive connection the server had just
                # closed (llama-server drops one after 100 requests) is retried once
                if attempt == 1:
                    continue
                raise UpstreamClosed("the model server closed the connection") from exc
            except aiohttp.ClientError as exc:
                raise UpstreamBroken(str(exc)) from exc
            return AiohttpResponse(response)
        raise AssertionError("unreachable")

    def idle_count(self, host: str, port: int) -> int:
        return 0

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def main() -> None:
    upstream.UpstreamPool = AiohttpPool  # type: ignore[misc, assignment]
    from launcher.cli.main import main as lalo

    sys.argv = ["lalo", *sys.argv[1:]]
    lalo()


if __name__ == "__main__":
    main()
