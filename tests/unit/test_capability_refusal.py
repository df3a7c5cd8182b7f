"""The capabilities on the real proxy app: listed in /v1/models and Ollama's /api/tags and
/api/show, and a request a model cannot serve refused in its API's own shape before any load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from launcher.engines.base import LaunchSpec, ServerSettings, base_url
from launcher.models.capabilities import ROUTE_NEEDS, capabilities_of
from launcher.models.gguf_file import GGUFInfo
from launcher.proxy.app import ProxySettings, create_app
from launcher.proxy.routes import MODEL_ROUTES
from launcher.proxy.upstream import UpstreamPool
from launcher.supervisor.events import SupervisorEvents
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.process import ManagedModel, Timeouts
from launcher.supervisor.records import SupervisedModel
from launcher.supervisor.supervisor import Supervisor


class NoEngine:
    kind: str = "fake"

    def launch_spec(self, settings: ServerSettings) -> LaunchSpec:
        return LaunchSpec(argv=("false",), env={}, base_url=base_url(settings.host, settings.port),
                          ready_path="/health", health_path="/health", health_needs_key=False)


def served(tmp_path: Path, events: SupervisorEvents, name: str, arch: str,
           spawned: list[str]) -> tuple[SupervisedModel, ManagedModel]:
    async def spawner(spec: LaunchSpec) -> asyncio.subprocess.Process:
        spawned.append(name)
        raise OSError("a refused request must not start the model")

    settings = ServerSettings(model_path=tmp_path / f"{name}.gguf", host="127.0.0.1", port=0,
                              api_key="", ctx_size=512, parallel=1, threads=None)
    info = GGUFInfo(path=settings.model_path, file_size=0, version=3,
                    metadata={"general.architecture": arch,
                              "tokenizer.chat_template": "{% if tools %}{% endif %}"},
                    array_lengths={}, tensors=())
    managed = ManagedModel(name, NoEngine(), settings, ModelLog(tmp_path / f"{name}.log"),
                           spawner=spawner, timeouts=Timeouts(load_timeout=2.0),
                           events=events.for_model(name, name))
    meta = SupervisedModel(name=name, aliases=(f"{name}-alias",), engine="fake", estimate=1,
                           preload=False, ttl=0, path=str(settings.model_path),
                           capabilities=capabilities_of(info, embeddings=False))
    return meta, managed


async def test_refused_in_each_api_shape_and_nothing_loads(tmp_path: Path) -> None:
    spawned: list[str] = []
    events = SupervisorEvents()
    supervisor = Supervisor([served(tmp_path, events, "smol", "llama", spawned),
                             served(tmp_path, events, "e5", "bert", spawned)], events=events)
    app = create_app(supervisor, ProxySettings(), UpstreamPool())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1:8080") as client:
        openai = await client.post("/v1/embeddings", json={"model": "smol-alias", "input": "x"})
        assert openai.status_code == 400
        assert openai.json()["error"] == {
            "message": "model smol does not serve embeddings: set models.smol.embeddings: true in "
                       "lalo.yaml (a chat model also needs args: [--pooling, mean])",
            "type": "invalid_request_error", "code": "model_capability"}
        anthropic = await client.post("/v1/messages", json={"model": "e5", "max_tokens": 8,
                                                            "messages": []})
        assert anthropic.status_code == 400
        assert anthropic.json()["type"] == "error"
        assert "e5 is an embedding model (bert)" in anthropic.json()["error"]["message"]
        for path, body in (("/api/embed", {"model": "smol", "input": "x"}),
                           ("/api/embeddings", {"model": "smol", "prompt": "x"}),
                           ("/api/chat", {"model": "e5", "messages": []}),
                           ("/api/generate", {"model": "e5:latest", "prompt": ""})):
            ollama = await client.post(path, json=body)
            assert ollama.status_code == 400, (path, ollama.text)
            assert "lalo.yaml" in ollama.json()["error"] or "cannot generate" in ollama.json()["error"]
        listed = {m["id"]: m["capabilities"] for m in (await client.get("/v1/models")).json()["data"]}
        assert listed == {"smol": ["chat", "completion", "tools"],
                          "smol-alias": ["chat", "completion", "tools"], "e5": [], "e5-alias": []}
        tags = {m["name"]: m["capabilities"] for m in (await client.get("/api/tags")).json()["models"]}
        assert tags == {"smol": ["completion", "tools"], "e5": []}
        show = await client.post("/api/show", json={"model": "smol"})
        assert show.json()["capabilities"] == ["completion", "tools"]
    assert spawned == []
    assert {m.state for m in supervisor.snapshot().values()} == {"stopped"}
    await supervisor.close()


def test_every_model_route_label_is_known_to_the_capabilities() -> None:
    labels = {route.label for route in MODEL_ROUTES.values()}
    assert set(ROUTE_NEEDS) <= labels
    assert labels - set(ROUTE_NEEDS) == {"tokenize", "detokenize"}  # ask nothing of the model
