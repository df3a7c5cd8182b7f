"""ANY /upstream/{model}/{path}: any other llama-server route of a model served here, passed
through as it is (raw ASGI, like the model routes)."""

from __future__ import annotations

from urllib.parse import quote

from starlette.types import Receive, Scope, Send

from launcher.proxy.asgi import BodyTooLarge, read_body
from launcher.proxy.errors import send_error
from launcher.proxy.forward import Forwarder
from launcher.proxy.router import Router
from launcher.proxy.upstream import UpstreamBadTarget, check_target
from launcher.supervisor.supervisor import Supervisor


class Passthrough:
    """The `/upstream` route: find the model (here only, never a peer's), check the path, forward."""

    def __init__(self, supervisor: Supervisor, router: Router, forwarder: Forwarder,
                 max_body_size: int) -> None:
        self.supervisor = supervisor
        self.router = router
        self.forwarder = forwarder
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        name = self.supervisor.resolve(params["model"])
        if name is None:
            return await send_error(send, 404, f"unknown model {params['model']!r}; known: "
                                               f"{self.router.known(peers=False)}")
        try:
            body = await read_body(scope, receive, self.max_body_size)
        except BodyTooLarge:
            return await send_error(
                send, 413, f"request body larger than {self.max_body_size} bytes")
        target = upstream_target(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            check_target(target + (f"?{query}" if query else ""))
        except UpstreamBadTarget as exc:
            return await send_error(send, 400, str(exc))
        headers = dict(scope["headers"])
        await self.forwarder.forward(
            receive, send, name, scope["method"], target, body, route="upstream", query=query,
            content_type=headers.get(b"content-type", b"application/json").decode("latin-1"),
        )


def upstream_target(scope: Scope) -> str:
    """The path after `/upstream/MODEL` exactly as the client sent it (still percent-encoded).

    The decoded path would turn `%20` into a space and `%0D%0A` into a line break in the
    request line to the model server.
    """
    raw: bytes | None = scope.get("raw_path")
    if raw is None:  # a server that does not pass the raw path: encode the decoded one again
        return "/" + quote(scope["path_params"]["path"], safe="/:@!$&'()*+,;=-._~")
    rest = raw.split(b"/", 3)  # b"", b"upstream", MODEL, the rest
    return "/" + (rest[3].decode("latin-1") if len(rest) > 3 else "")
