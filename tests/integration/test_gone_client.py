"""lalo's llama.cpp patch 0004 on a real llama-server with SmolLM2: a non-streamed request whose
client closed the connection frees its slot within the server's polling interval (1 s) while
another request keeps generating. Unpatched, the other request's results restarted the wait
that checks for a closed connection, and the abandoned request ran to its `n_predict`."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.patch_series import NOTICES_GONE_CLIENTS
from tests.support.lalo import free_port, wait_until
from tests.support.llama_server import KEY, Server, running, skip_unless_patched

pytestmark = pytest.mark.integration

PROMPT = "The history of the bicycle begins in"


@pytest.fixture
def two_slots(llama_server_bin: Path, smollm2: Path, tmp_path: Path) -> Iterator[Server]:
    skip_unless_patched(llama_server_bin, NOTICES_GONE_CLIENTS)
    spec = LlamaServerEngine.with_patches(llama_server_bin, [NOTICES_GONE_CLIENTS]).launch_spec(
        ServerSettings(model_path=smollm2, host="127.0.0.1", port=free_port(), api_key=KEY,
                       ctx_size=4096, parallel=2, threads=2))
    with running(list(spec.argv), dict(spec.env), spec.base_url, tmp_path / "log") as started:
        yield started


def busy_slots(client: httpx.Client) -> int:
    return sum(1 for slot in client.get("/slots").json() if slot.get("is_processing"))


def abandoned_request(server: Server, n_predict: int) -> socket.socket:
    """A non-streamed completion sent on a raw connection, to be closed without reading."""
    body = json.dumps({"prompt": PROMPT, "n_predict": n_predict, "ignore_eos": True,
                       "temperature": 0, "stream": False}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    return sock


def test_a_gone_non_streamed_client_frees_its_slot_while_another_generates(
    two_slots: Server,
) -> None:
    streamed: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        with two_slots.client() as client, client.stream("POST", "/completion", json={
                "prompt": PROMPT, "n_predict": 3000, "ignore_eos": True, "temperature": 0,
                "stream": True}) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    streamed.append(1)
                if stop.is_set():
                    return  # closing the stream stops it at the next token

    other = threading.Thread(target=stream, daemon=True)
    other.start()
    with two_slots.client() as client:
        wait_until(lambda: len(streamed) > 5, timeout=60, message="the other request to stream")
        sock = abandoned_request(two_slots, n_predict=3000)
        try:
            wait_until(lambda: busy_slots(client) == 2, timeout=30,
                       message="the non-streamed request to take the second slot")
            # it generates while the other streams: 20 more tokens of the other's
            seen = len(streamed)
            wait_until(lambda: len(streamed) > seen + 20, timeout=30,
                       message="both requests to generate")
        finally:
            sock.close()
        # the other request's tokens keep arriving all along: unpatched, they kept the server
        # from ever checking the closed connection, and this waited for 3000 tokens
        # 1 s of polling; 15 s allowed for a shared machine, far below the 3000 tokens' time
        wait_until(lambda: busy_slots(client) == 1, timeout=15,
                   message="the abandoned request's slot to be freed")
        still_streaming = len(streamed)
        wait_until(lambda: len(streamed) > still_streaming + 5, timeout=15,
                   message="the other request to go on after the slot was freed")
        stop.set()
        other.join(30)
        wait_until(lambda: busy_slots(client) == 0, timeout=15, message="both slots idle")
