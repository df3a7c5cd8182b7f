"""An async client for the LALO backend: lalo's OpenAI-compatible port, with typed errors.

Replaces the original plan's in-process `LlamaInferenceService`: models run in lalo's
supervised servers, the backend only talks HTTP.

    LaloClientError                 any failure talking to lalo
    ├── LaloConnectionError         lalo is not reachable
    └── LaloAPIError                lalo answered with an error envelope (status, type, code)
        ├── BadRequestError         400 / 413
        ├── AuthenticationError     401
        ├── ModelNotFoundError      404
        ├── QueueFullError          429 (retry_after seconds)
        ├── ModelUnavailableError   503 (failed, or does not fit in RAM)
        └── UpstreamError           502 / 504 / an error event inside a stream

    async with LaloClient("http://127.0.0.1:8080") as lalo:
        text = await lalo.generate("Hello", model="liquid-tool", max_tokens=64)
        async for piece in lalo.stream_generate("Hello", model="liquid-tool"):
            print(piece, end="")
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

# Below lalo's proxy's own keep-alive (launcher.serve.proxy_server.CLIENT_KEEPALIVE_S, 30 s).
KEEPALIVE_S = 20.0


class LaloClientError(Exception):
    pass


class LaloConnectionError(LaloClientError):
    pass


class LaloAPIError(LaloClientError):
    def __init__(self, status: int, message: str, type_: str = "", code: str = "") -> None:
        super().__init__(f"{status} {code or type_}: {message}")
        self.status = status
        self.message = message
        self.type = type_
        self.code = code


class BadRequestError(LaloAPIError):
    pass


class AuthenticationError(LaloAPIError):
    pass


class ModelNotFoundError(LaloAPIError):
    pass


class QueueFullError(LaloAPIError):
    retry_after: float | None = None


class ModelUnavailableError(LaloAPIError):
    pass


class UpstreamError(LaloAPIError):
    pass


_BY_STATUS: dict[int, type[LaloAPIError]] = {
    400: BadRequestError, 413: BadRequestError, 401: AuthenticationError,
    404: ModelNotFoundError, 429: QueueFullError, 503: ModelUnavailableError,
    502: UpstreamError, 504: UpstreamError,
}


def _error_from(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> LaloAPIError:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message", "")) or f"HTTP {status}"
        kind, code = str(error.get("type", "")), str(error.get("code", ""))
    else:
        message, kind, code = (str(payload)[:500] if payload else f"HTTP {status}"), "", ""
    cls = _BY_STATUS.get(status, LaloAPIError)
    exc = cls(status, message, kind, code)
    if isinstance(exc, QueueFullError) and headers is not None:
        retry = headers.get("retry-after")
        exc.retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    return exc


class LaloClient:
    """One pooled connection to lalo for the life of the client (`async with` or `aclose()`)."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float = 600.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        base = base_url or os.environ.get("LALO_URL", "http://127.0.0.1:8080")
        key = api_key if api_key is not None else os.environ.get("LALO_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # Idle connections are dropped after 20 s, before lalo's proxy drops them (30 s), so
        # a request never goes out on a connection the server is closing.
        self._http = httpx.AsyncClient(base_url=base.rstrip("/"), headers=headers,
                                       timeout=httpx.Timeout(timeout, connect=10.0),
                                       limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S),
                                       transport=transport, trust_env=False)

    async def __aenter__(self) -> LaloClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- the plan's LlamaInferenceService interface ----------------------------------------------
    async def generate(self, prompt: str, model: str, max_tokens: int = 512,
                       temperature: float = 0.7, **options: Any) -> str:
        """The completed text for `prompt` (a single user message to the chat endpoint)."""
        body = self._chat_body(prompt, model, max_tokens, temperature, stream=False, **options)
        data = await self._post_json("/v1/chat/completions", body)
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise UpstreamError(502, f"unexpected answer shape: {str(data)[:200]}") from exc

    async def stream_generate(self, prompt: str, model: str, max_tokens: int = 512,
                              temperature: float = 0.7, **options: Any) -> AsyncIterator[str]:
        """The text as it is generated, piece by piece."""
        body = self._chat_body(prompt, model, max_tokens, temperature, stream=True, **options)
        async for event in self._stream("/v1/chat/completions", body):
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece

    async def list_models(self) -> list[str]:
        """Every model name and alias lalo routes."""
        data = await self._get_json("/v1/models")
        return [str(item["id"]) for item in data.get("data", [])]

    async def get_model_info(self, name: str) -> dict[str, Any]:
        """State, engine, memory, restarts of one model (by name or alias)."""
        status = await self._get_json("/api/status")
        for model in status.get("models", []):
            if name == model["name"] or name in model.get("aliases", ()):
                return dict(model)
        raise ModelNotFoundError(404, f"unknown model {name!r}", "invalid_request_error",
                                 "model_not_found")

    # --- OpenAI-shaped calls -----------------------------------------------------------------
    async def chat(self, messages: Sequence[Mapping[str, Any]], model: str, **options: Any) -> dict[str, Any]:
        return await self._post_json("/v1/chat/completions",
                                     {"model": model, "messages": list(messages), **options})

    async def embed(self, inputs: str | Sequence[str], model: str) -> list[list[float]]:
        data = await self._post_json("/v1/embeddings", {"model": model, "input": inputs})
        return [list(item["embedding"]) for item in data.get("data", [])]

    # --- transport -----------------------------------------------------------------------------
    @staticmethod
    def _chat_body(prompt: str, model: str, max_tokens: int, temperature: float, *,
                   stream: bool, **options: Any) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": temperature, "stream": stream, **options}

    async def _get_json(self, path: str) -> dict[str, Any]:
        try:
            response = await self._http.get(path)
        except httpx.TransportError as exc:
            raise LaloConnectionError(f"lalo is not reachable at {self._http.base_url}: {exc}") from exc
        return self._json_or_raise(response, response.content)

    async def _post_json(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise LaloConnectionError(f"lalo is not reachable at {self._http.base_url}: {exc}") from exc
        return self._json_or_raise(response, response.content)

    @staticmethod
    def _json_or_raise(response: httpx.Response, content: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(content) if content else {}
        except ValueError:
            payload = content.decode("utf-8", errors="replace")
        if response.status_code >= 400:
            raise _error_from(response.status_code, payload, response.headers)
        if not isinstance(payload, dict):
            raise UpstreamError(502, f"expected a JSON object, got: {str(payload)[:200]}")
        return payload

    async def _stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    content = await response.aread()
                    self._json_or_raise(response, content)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and "error" in event:
                        error = event["error"] if isinstance(event["error"], dict) else {}
                        raise UpstreamError(502, str(error.get("message", event["error"])),
                                            str(error.get("type", "")), str(error.get("code", "")))
                    if isinstance(event, dict):
                        yield event
        except httpx.TransportError as exc:
            raise LaloConnectionError(f"connection to lalo broke: {exc}") from exc
