"""Keys with roles: every route of the real proxy app, for an inference key, an admin key,
a plain-string key, the admin token and no key; and the proxy.api_keys entry shapes."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from launcher.config import ApiKey, ProxyConfig, parse_config
from launcher.errors import ConfigError
from launcher.proxy.app import ProxySettings, create_app
from launcher.proxy.ollama import OLLAMA_ROUTES
from launcher.proxy.routes import MODEL_ROUTES
from launcher.proxy.upstream import UpstreamPool
from launcher.supervisor.supervisor import Supervisor

KEYS = (ApiKey(key="sk-app", name="backend", role="inference"),
        ApiKey(key="sk-ops", name="ops", role="admin"), "sk-plain")
TOKEN = "the-admin-token"

# every route the app has besides the model and Ollama routes: (method, path as sent, role)
APP_ROUTES = {
    "/health": ("GET", "/health", "open"),
    "/": ("GET", "/", "open"),
    "/v1/models": ("GET", "/v1/models", "inference"),
    "/api/status": ("GET", "/api/status", "inference"),
    "/api/history": ("GET", "/api/history", "inference"),
    "/metrics": ("GET", "/metrics", "inference"),
    "/upstream/{model}/{path:path}": ("GET", "/upstream/m/slots", "admin"),
    "/api/models/{name}/load": ("POST", "/api/models/m/load", "admin"),
    "/api/models/{name}/unload": ("POST", "/api/models/m/unload", "admin"),
    "/api/models/{name}/restart": ("POST", "/api/models/m/restart", "admin"),
    "/api/models/{name}/logs": ("GET", "/api/models/m/logs", "admin"),
    "/api/models/{name}/logs/stream": ("GET", "/api/models/m/logs/stream", "admin"),
    "/api/logs/stream": ("GET", "/api/logs/stream", "admin"),
    "/api/activity": ("GET", "/api/activity", "admin"),
    "/api/shutdown": ("POST", "/api/shutdown", "admin"),
    "/api/reload": ("POST", "/api/reload", "admin"),
}
STREAMS = {"/api/logs/stream"}  # an admin's request would stay open: checked for 403 only


def every_route() -> list[tuple[str, str, str]]:
    rows = [("POST", path, "inference") for path in MODEL_ROUTES]
    rows += [(method, path, "inference") for path, method in OLLAMA_ROUTES.items()]
    return rows + list(APP_ROUTES.values())


async def call(method: str, path: str, key: str | None) -> httpx.Response:
    app = create_app(Supervisor([]), ProxySettings(api_keys=KEYS, admin_token=TOKEN),
                     UpstreamPool())
    headers = {"authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        return await client.request(method, path, headers=headers, content=b"{}")


async def test_the_table_covers_every_route_of_the_app() -> None:
    answer = await call("GET", "/no/such/route", "sk-ops")
    assert answer.status_code == 404
    listed = re.search(r"routes: (.*)$", answer.json()["error"]["message"])
    assert listed is not None
    served = {path for path in listed.group(1).split(", ") if not path.startswith("/static")}
    covered = set(MODEL_ROUTES) | set(OLLAMA_ROUTES) | set(APP_ROUTES)
    assert served == covered, f"routes without a role in this test: {served - covered}"


@pytest.mark.parametrize(("method", "path", "role"), every_route())
async def test_inference_key_gets_model_routes_and_views_only(method: str, path: str,
                                                              role: str) -> None:
    answer = await call(method, path, "sk-app")
    if role == "admin":
        assert answer.status_code == 403, answer.text
        error = answer.json()["error"]
        assert error["type"] == "permission_error"
        assert "'backend' has the inference role" in error["message"]
        assert "sk-app" not in error["message"]
    else:
        assert answer.status_code not in (401, 403), answer.text


@pytest.mark.parametrize("key", ["sk-ops", "sk-plain", TOKEN])
@pytest.mark.parametrize(("method", "path", "role"),
                         [row for row in every_route() if row[1] not in STREAMS])
async def test_admin_keys_reach_every_route(method: str, path: str, role: str, key: str) -> None:
    answer = await call(method, path, key)
    assert answer.status_code not in (401, 403), answer.text


@pytest.mark.parametrize(("method", "path", "role"), every_route())
async def test_no_key_reaches_only_open_routes(method: str, path: str, role: str) -> None:
    answer = await call(method, path, None)
    if role == "open":
        assert answer.status_code == 200
    else:
        assert answer.status_code == 401


async def test_a_wrong_key_is_401_not_403() -> None:
    assert (await call("POST", "/api/models/m/unload", "sk-nope")).status_code == 401


def test_key_entries_plain_and_with_roles() -> None:
    proxy = ProxyConfig.model_validate({"api_keys": [
        "sk-old", {"key": "sk-app", "name": "backend", "role": "inference"},
        {"key": "sk-ops", "name": "ops"}]})
    assert [(k.key, k.name, k.role) for k in proxy.api_keys] == [
        ("sk-old", "key1", "admin"), ("sk-app", "backend", "inference"), ("sk-ops", "ops", "admin")]


@pytest.mark.parametrize(("entries", "fragment"), [
    ([{"key": "a", "name": "x", "role": "root"}], "inference"),
    ([{"key": "a", "name": "x"}, {"key": "b", "name": "x"}], "two keys are named 'x'"),
    (["a", "a"], "listed twice"),
    ([{"key": " a", "name": "x"}], "no spaces"),
    ([{"key": "a"}], "name"),
    ([{"key": "a", "name": "bad name"}], "must match"),
])
def test_bad_key_entries_are_refused(entries: list[object], fragment: str) -> None:
    text = json.dumps({"proxy": {"api_keys": entries}})
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_config(text, label="lalo.yaml")


def test_env_keys_are_admin_keys_with_free_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.config import Config
    from launcher.serve.proxy_server import api_keys

    config = Config.model_validate({"proxy": {"api_keys": [
        "sk-a", {"key": "sk-b", "name": "env1", "role": "inference"}]}})
    monkeypatch.setenv("LALO_API_KEYS", " sk-c , sk-a,,sk-d")
    assert [(k.key, k.name, k.role) for k in api_keys(config)] == [
        ("sk-a", "key1", "admin"), ("sk-b", "env1", "inference"),
        ("sk-c", "env2", "admin"), ("sk-d", "env3", "admin")]
