"""The Ollama API on the proxy port, so tools written for Ollama run on lalo unchanged.

Translation only: generation and embeddings go through the same Forwarder as the OpenAI routes
(lease, queue, on-demand load, disconnect cancel, metrics) to llama-server's OpenAI routes, and
the answer is rewritten on its way out: server-sent events become Ollama's NDJSON lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Final

from starlette.types import Receive, Scope, Send

from launcher import __version__
from launcher.errors import CapacityError, GGUFError, ModelError
from launcher.models.gguf_file import GGUFInfo, read_gguf
from launcher.proxy.asgi import BodyTooLarge, read_body
from launcher.proxy.errors import error_message
from launcher.proxy.forward import Forwarder
from launcher.proxy.ollama_convert import (
    OllamaRequestError,
    openai_messages,
    parse_keep_alive,
    response_format,
    sampling_fields,
    timestamp,
)
from launcher.proxy.ollama_stream import CapturedAnswer, StreamTranslator, send_json, whole_answer
from launcher.supervisor.snapshot import ModelSnapshot
from launcher.supervisor.supervisor import Supervisor
from launcher.units import format_parameters

log = logging.getLogger(__name__)

OLLAMA_ROUTES: Final[dict[str, str]] = {
    "/api/tags": "GET",
    "/api/ps": "GET",
    "/api/version": "GET",
    "/api/show": "POST",
    "/api/chat": "POST",
    "/api/generate": "POST",
    "/api/embed": "POST",
    "/api/embeddings": "POST",
}
# The Ollama release whose API this follows (clients check it before using newer fields).
OLLAMA_API_VERSION: Final = "0.12.0"
_FOREVER: Final = "2318-01-01T00:00:00Z"  # what Ollama reports for a model kept loaded forever
_AT_ONCE = 0.001  # keep_alive 0 for a model in use: unloaded the moment it is idle


class OllamaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OllamaAPI:
    """Raw ASGI handler of every path in OLLAMA_ROUTES."""

    def __init__(self, supervisor: Supervisor, forwarder: Forwarder, max_body_size: int,
                 started: float) -> None:
        self.supervisor = supervisor
        self.forwarder = forwarder
        self.max_body_size = max_body_size
        self.started = started
        self._facts: dict[tuple[str, int], GGUFInfo | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method = OLLAMA_ROUTES[path]
        if scope["method"] != method and not (method == "GET" and scope["method"] == "HEAD"):
            return await send_json(send, 405, {"error": f"{scope['method']} is not allowed on {path}"})
        try:
            if method == "GET":
                if path == "/api/version":
                    return await send_json(send, 200, self.version())
                answer = await (self.tags() if path == "/api/tags" else self.ps())
                return await send_json(send, 200, answer)
            try:
                body = await read_body(scope, receive, self.max_body_size)
            except BodyTooLarge:
                raise OllamaError(413, f"request body larger than {self.max_body_size} bytes") from None
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                raise OllamaError(400, f"request body is not valid JSON: {exc}") from None
            if not isinstance(payload, dict):
                raise OllamaError(400, "request body must be a JSON object")
            if path == "/api/show":
                return await send_json(send, 200, await self.show(payload))
            if path in ("/api/embed", "/api/embeddings"):
                return await self.embed(payload, receive, send, legacy=path == "/api/embeddings")
            await self.generate(payload, receive, send, chat=path == "/api/chat")
        except OllamaRequestError as exc:
            await send_json(send, 400, {"error": str(exc)})
        except OllamaError as exc:
            await send_json(send, exc.status, {"error": str(exc)})

    # --- names and facts ----------------------------------------------------------------------
    def _resolve(self, payload: dict[str, Any], key: str = "model") -> tuple[str, str]:
        """(lalo's model name, the name as the client gave it)."""
        requested = payload.get(key) or (payload.get("name") if key == "model" else None)
        if not isinstance(requested, str) or not requested:
            raise OllamaError(400, f"missing '{key}': name one of {self._known()}")
        name = self.supervisor.resolve(requested)
        if name is None and requested.endswith(":latest"):  # Ollama's default tag
            name = self.supervisor.resolve(requested.removesuffix(":latest"))
        if name is None:
            raise OllamaError(404, f"model '{requested}' not found; known: {self._known()}")
        return name, requested

    def _refuse(self, name: str, route: str) -> None:
        """A 400 naming the lalo setting for a request `name` cannot serve, before any load
        (`route`: a `launcher.proxy.routes` label)."""
        capabilities = self.supervisor.capabilities.get(name)
        refused = capabilities.refusal(route, name) if capabilities is not None else None
        if refused is not None:
            raise OllamaError(400, refused)

    def _known(self) -> str:
        return ", ".join(self.supervisor.names) or "(none configured)"

    def _model(self, name: str) -> ModelSnapshot:
        return self.supervisor.snapshot()[name]

    def _file(self, name: str) -> tuple[Path, int, float, int]:
        """A model file's path, size, mtime and mtime in ns (zeros when it cannot be read)."""
        path = Path(self._model(name).path)
        try:
            stat = path.stat()
        except OSError:
            return path, 0, self.started, 0
        return path, stat.st_size, stat.st_mtime, stat.st_mtime_ns

    async def _info(self, name: str) -> GGUFInfo | None:
        """The model file's GGUF header, read once per file version (off the event loop: a
        large vocabulary takes a tenth of a second to parse, streams must not wait on it)."""
        path, _, _, mtime_ns = self._file(name)
        key = (str(path), mtime_ns)
        if key not in self._facts:
            try:
                self._facts[key] = await asyncio.to_thread(read_gguf, path)
            except GGUFError:
                self._facts[key] = None
        return self._facts[key]

    async def _entry(self, name: str) -> dict[str, Any]:
        """What /api/tags and /api/ps say about one model."""
        path, size, modified, _ = self._file(name)
        info = await self._info(name)
        details = {
            "parent_model": "",
            "format": "gguf",
            "family": info.architecture if info else "",
            "families": [info.architecture] if info else [],
            "parameter_size": format_parameters(info.parameter_count) if info else "",
            "quantization_level": info.file_type if info else "",
        }
        # not the file's sha256 (hashing gigabytes per listing is too slow): path, size, mtime
        digest = hashlib.sha256(f"{path}:{size}:{modified}".encode()).hexdigest()
        capabilities = self._model(name).capabilities
        return {"name": name, "model": name, "modified_at": timestamp(modified), "size": size,
                "digest": digest, "details": details,
                "capabilities": capabilities.ollama_names() if capabilities else ["completion"]}

    async def tags(self) -> dict[str, Any]:
        return {"models": [await self._entry(name) for name in self.supervisor.snapshot()]}

    async def ps(self) -> dict[str, Any]:
        running = []
        for name, model in self.supervisor.snapshot().items():
            if model.lifecycle not in ("ready", "starting"):
                continue
            entry = await self._entry(name)
            entry.pop("modified_at")
            entry["size"] = model.rss or model.required
            entry["size_vram"] = 0
            entry["expires_at"] = _expires_at(model)
            entry["context_length"] = model.ctx_size
            running.append(entry)
        return {"models": running}

    def version(self) -> dict[str, Any]:
        return {"version": OLLAMA_API_VERSION, "lalo": __version__}

    async def show(self, payload: dict[str, Any]) -> dict[str, Any]:
        name, _ = self._resolve(payload)
        info = await self._info(name)
        entry = await self._entry(name)
        template = str(info.metadata.get("tokenizer.chat_template", "")) if info else ""
        model_info: dict[str, Any] = {}
        if info is not None:
            model_info = {key: value for key, value in info.metadata.items()
                          if not isinstance(value, list | bytes) and key != "tokenizer.chat_template"}
            model_info["general.parameter_count"] = info.parameter_count
        return {
            "modelfile": f"FROM {self._model(name).path}\n",
            "parameters": "",
            "template": template,
            "details": entry["details"],
            "model_info": model_info,
            "capabilities": entry["capabilities"],
            "modified_at": entry["modified_at"],
        }

    # --- load, unload, keep_alive -------------------------------------------------------------
    async def _load(self, name: str) -> float:
        """Seconds spent loading `name` before this request (0 when it was ready)."""
        if self._model(name).lifecycle == "ready":
            return 0.0
        started = time.perf_counter()
        try:
            await self.supervisor.load(name)
        except CapacityError as exc:
            raise OllamaError(503, str(exc)) from exc
        except ModelError as exc:
            raise OllamaError(503, str(exc)) from exc
        return time.perf_counter() - started

    def _keep_alive(self, name: str, seconds: float | None) -> None:
        """After a request: keep forever (< 0), or unload once idle that long; absent:
        lalo.yaml's ttl decides again. The supervisor's idle unload applies it."""
        self.supervisor.set_idle_timeout(name, seconds)

    # --- generation ---------------------------------------------------------------------------
    async def generate(self, payload: dict[str, Any], receive: Receive, send: Send, *,
                       chat: bool) -> None:
        name, requested = self._resolve(payload)
        self._refuse(name, "chat")  # as Ollama: a model that cannot generate is not loaded either
        keep_alive = parse_keep_alive(payload.get("keep_alive"))
        stream = payload.get("stream", True) is not False
        begun = time.perf_counter()
        if chat:
            messages = openai_messages(payload.get("messages") or [])
            empty = not messages
        else:
            prompt = payload.get("prompt") or ""
            if not isinstance(prompt, str):
                raise OllamaRequestError("prompt: expected a string")
            if payload.get("suffix"):
                raise OllamaRequestError("suffix: fill-in-the-middle is served by POST /infill, "
                                         "not by /api/generate")
            empty = not prompt and not payload.get("images")
            messages = []
            if isinstance(payload.get("system"), str) and payload["system"]:
                messages.append({"role": "system", "content": payload["system"]})
            messages += openai_messages([{"role": "user", "content": prompt,
                                          "images": payload.get("images")}])
        if empty:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            return await self._load_or_unload(send, name, requested, keep_alive, chat)
        load_seconds = await self._load(name)
        raw = not chat and payload.get("raw") is True
        body: dict[str, Any] = {"model": name, "stream": stream}
        if raw:
            body["prompt"] = payload.get("prompt")
            path = "/v1/completions"
        else:
            body["messages"] = messages
            path = "/v1/chat/completions"
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(sampling_fields(payload.get("options")))
        fmt = response_format(payload.get("format"))
        if fmt is not None:
            body["response_format"] = fmt
        if chat and payload.get("tools"):
            body["tools"] = payload["tools"]
        if payload.get("think") is False:
            body["reasoning_format"] = "none"
        encoded = json.dumps(body).encode()
        label = "ollama_chat" if chat else "ollama_generate"
        try:
            if stream:
                translator = StreamTranslator(send, requested, chat, begun, load_seconds)
                await self.forwarder.forward(receive, translator.send, name, "POST", path, encoded,
                                             route=label)
            else:
                captured = CapturedAnswer()
                await self.forwarder.forward(
                    receive, captured.send, name, "POST", path, encoded, route=label,
                    payload=body)  # asked as a stream where it can be (see assemble.py)
                if captured.status != 200:
                    raise OllamaError(captured.status, error_message(b"".join(captured.body)))
                answer = whole_answer(captured.json(), requested, chat, begun, load_seconds)
                await send_json(send, 200, answer)
        finally:
            await self._after(name, keep_alive)

    async def _after(self, name: str, keep_alive: float | None) -> None:
        if keep_alive is not None and keep_alive == 0:
            if not self._model(name).busy:
                await self.supervisor.unload(name, "keep_alive 0 (Ollama API)")
            else:  # in use by another request: unloaded as soon as it is idle
                self.supervisor.set_idle_timeout(name, _AT_ONCE)
        else:
            self._keep_alive(name, keep_alive)

    async def _load_or_unload(self, send: Send, name: str, requested: str,
                              keep_alive: float | None, chat: bool) -> None:
        if keep_alive == 0:
            await self.supervisor.unload(name, "keep_alive 0 (Ollama API)")
            reason = "unload"
        else:
            await self._load(name)
            self._keep_alive(name, keep_alive)
            reason = "load"
        answer: dict[str, Any] = {"model": requested, "created_at": timestamp(), "done": True,
                                  "done_reason": reason}
        if chat:
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        await send_json(send, 200, answer)

    # --- embeddings ---------------------------------------------------------------------------
    async def embed(self, payload: dict[str, Any], receive: Receive, send: Send, *,
                    legacy: bool) -> None:
        name, requested = self._resolve(payload)
        self._refuse(name, "embeddings")
        keep_alive = parse_keep_alive(payload.get("keep_alive"))
        begun = time.perf_counter()
        if legacy:
            text = payload.get("prompt")
            if not isinstance(text, str):
                raise OllamaRequestError("prompt: expected a string")
            inputs: list[str] = [text]
        else:
            value = payload.get("input")
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise OllamaRequestError("input: expected a string or a list of strings")
            inputs = value
        load_seconds = await self._load(name)
        body: dict[str, Any] = {"model": name, "input": inputs, "encoding_format": "float"}
        if isinstance(payload.get("dimensions"), int):
            body["dimensions"] = payload["dimensions"]
        captured = CapturedAnswer()
        try:
            await self.forwarder.forward(receive, captured.send, name, "POST", "/v1/embeddings",
                                         json.dumps(body).encode(), route="ollama_embed")
        finally:
            await self._after(name, keep_alive)
        if captured.status != 200:
            raise OllamaError(captured.status, error_message(b"".join(captured.body)))
        result = captured.json()
        vectors = [item["embedding"] for item in sorted(result["data"], key=lambda d: d["index"])]
        if legacy:
            return await send_json(send, 200, {"embedding": vectors[0]})
        usage = result.get("usage") or {}
        await send_json(send, 200, {
            "model": requested,
            "embeddings": vectors,
            "total_duration": int((time.perf_counter() - begun) * 1e9),
            "load_duration": int(load_seconds * 1e9),
            "prompt_eval_count": int(usage.get("prompt_tokens", 0)),
        })


def _expires_at(model: ModelSnapshot) -> str:
    if model.ttl > 0:
        idle_since = model.idle_since or time.monotonic()
        return timestamp(time.time() + max(0.0, model.ttl - (time.monotonic() - idle_since)))
    return _FOREVER
