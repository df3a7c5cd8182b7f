"""lalo.yaml: lookup order, validation, and the exact one-line errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import load_config, parse_config
from launcher.errors import ConfigError

GIB = 1024**3


def error_of(text: str, total_ram: int = 24 * GIB) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, label="lalo.yaml", total_ram=total_ram)
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("proxy:\n  port: 0\n", "lalo.yaml:2: proxy.port: must be >= 1, got 0"),
        ("proxy:\n  port: 70000\n", "lalo.yaml:2: proxy.port: must be <= 65535, got 70000"),
        ("proxy:\n  port: '8080'\n", "lalo.yaml:2: proxy.port: must be an integer, got '8080'"),
        (
            "proxy:\n  prot: 1\n",
            "lalo.yaml:2: proxy.prot: unknown key (known keys: host, port, api_keys, "
            "max_body_size, queue_size, upstream_timeout, allowed_hosts, cors_origins, activity)",
        ),
        (
            "proxy:\n  allowed_hosts: ['http://lalo.lan']\n",
            "lalo.yaml:2: proxy.allowed_hosts: 'http://lalo.lan' is not a host name (no scheme, "
            "port or path; '*.' may start a name)",
        ),
        (
            "proxy:\n  cors_origins: ['https://app.example/path']\n",
            "lalo.yaml:2: proxy.cors_origins: 'https://app.example/path' is not an origin "
            "(scheme://host[:port], no path), '*' or 'null'",
        ),
        (
            "models:\n  a:\n    file: x.gguf\n    ctx_size: 0\n",
            "lalo.yaml:4: models.a.ctx_size: must be >= 128, got 0",
        ),
        (
            "models:\n  a:\n    file: x.gguf\n    threads: many\n",
            "lalo.yaml:4: models.a.threads: must be 'auto' or an integer from 1 to 1024, got 'many'",
        ),
        (
            "models:\n  a:\n    ctx_size: 512\n",
            "lalo.yaml:2: models.a: give exactly one of 'file' or 'catalog'",
        ),
        (
            "models:\n  a:\n    file: x.gguf\n    engine: ollama\n",
            "lalo.yaml:4: models.a.engine: must be one of 'llama-server', 'llamafile' or "
            "'llama-cpp-python', got 'ollama'",
        ),
        (
            "models:\n  a:\n    file: x.gguf\n    aliases: [c]\n  b:\n    file: y.gguf\n"
            "    aliases: [d, c]\n",
            "lalo.yaml:7: models.b.aliases: 'c' is already an alias of 'a'",
        ),
        (
            "models:\n  a:\n    file: x.gguf\n    aliases: [b]\n  b:\n    file: y.gguf\n",
            "lalo.yaml:4: models.a.aliases: 'b' is the name of model 'b'",
        ),
        (
            "resources:\n  ram_budget: 100GiB\n",
            "lalo.yaml:2: resources.ram_budget: 100 GiB is more than this machine's RAM (24.0 GiB)",
        ),
        (
            "resources:\n  ram_budget: lots\n",
            "lalo.yaml:2: resources.ram_budget: not a size: 'lots' (use e.g. 512MiB, 6GiB or a "
            "number of bytes)",
        ),
        ("models: [1]\n", "lalo.yaml:1: models: must be a mapping, got [1]"),
        ("proxy: {port: [}\n", "lalo.yaml:1: invalid YAML: expected the node content, but found '}'"),
        ("- a\n", "lalo.yaml: the top level must be a mapping, got list"),
        (
            "models:\n  a:\n    file: x.gguf\n    env: {A: 1}\n",
            "lalo.yaml:4: models.a.env.A: must be a string, got 1",
        ),
        (
            "models:\n  'a b':\n    file: x.gguf\n",
            "lalo.yaml:1: models: model name 'a b' must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        ),
    ],
)
def test_config_errors_name_the_path_and_line(text: str, message: str) -> None:
    assert error_of(text) == message


def test_defaults_match_the_contract() -> None:
    config = parse_config("models:\n  m:\n    file: m.gguf\n", label="x", total_ram=8 * GIB)
    assert config.proxy.host == "127.0.0.1"
    assert config.proxy.port == 8080
    assert config.resources.ram_budget == "auto"
    assert config.resources.ram_reserve == GIB
    model = config.models["m"]
    assert (model.engine_kind, model.ctx_size, model.threads, model.parallel) == (
        "llama-server", 2048, "auto", 1)
    assert model.preload is True and model.ttl == 0


def test_sizes_and_llamafile_engine_default() -> None:
    config = parse_config(
        "resources: {ram_budget: 6GiB, ram_reserve: 512MiB}\n"
        "models:\n  m: {file: m.llamafile, aliases: [x, y]}\n",
        label="x",
        total_ram=8 * GIB,
    )
    assert config.resources.ram_budget == 6 * GIB
    assert config.resources.ram_reserve == 512 * 1024**2
    assert config.models["m"].engine_kind == "llamafile"
    assert config.models["m"].aliases == ("x", "y")


def test_config_is_frozen() -> None:
    config = parse_config("", label="x", total_ram=GIB)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        config.proxy.port = 1  # type: ignore[misc]


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    for name, port in (("explicit", 1001), ("env", 1002), ("cwd", 1003), ("user", 1004)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lalo.yaml").write_text(f"proxy: {{port: {port}}}\n")
    monkeypatch.setenv("LALO_CONFIG_DIR", str(tmp_path / "user"))
    monkeypatch.setenv("LALO_CONFIG", str(tmp_path / "env" / "lalo.yaml"))
    monkeypatch.chdir(tmp_path / "cwd")
    assert load_config(tmp_path / "explicit" / "lalo.yaml").config.proxy.port == 1001
    assert load_config().config.proxy.port == 1002
    monkeypatch.delenv("LALO_CONFIG")
    assert load_config().config.proxy.port == 1003
    monkeypatch.chdir(tmp_path)
    assert load_config().config.proxy.port == 1004
    monkeypatch.setenv("LALO_CONFIG_DIR", str(tmp_path / "nowhere"))
    builtin = load_config(default=lambda: {"proxy": {"port": 1005}})
    assert builtin.source is None and builtin.config.proxy.port == 1005


def test_missing_config_and_model_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    config = tmp_path / "lalo.yaml"
    config.write_text("models:\n  m:\n    file: models/m.gguf\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert str(caught.value) == (
        f"{config.resolve()}: models.m.file: {tmp_path.resolve() / 'models/m.gguf'} does not exist"
    )
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")
    loaded = load_config(config)
    assert loaded.model_path("m") == (tmp_path / "models" / "m.gguf").resolve()


def test_allowed_hosts_and_cors_origins_are_read_lower_case() -> None:
    config = parse_config("proxy:\n  allowed_hosts: [Lalo.Internal, '*.lan']\n"
                          "  cors_origins: ['https://App.example:8443', '*']\n", label="lalo.yaml")
    assert config.proxy.allowed_hosts == ("lalo.internal", "*.lan")
    assert config.proxy.cors_origins == ("https://app.example:8443", "*")
