"""Bundle specs: parsing, errors that name the YAML path and line, and the licence gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import ConfigError, LicenseError
from launcher.packaging.inputs import gate, model_inputs
from launcher.packaging.spec import DEFAULT_EMBED_LIMIT, TARGETS, find_spec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
MINIMAL = """\
name: demo
models:
  tiny: {file: tiny.gguf, license: MIT, ctx_size: 512}
"""


def spec_at(tmp_path: Path, text: str, name: str = "demo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def parse(tmp_path: Path, text: str) -> object:
    return parse_spec(text, source=spec_at(tmp_path, text))


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, text)
    return str(caught.value)


def test_minimal_spec_gets_the_documented_defaults(tmp_path: Path) -> None:
    spec = parse_spec(MINIMAL, source=spec_at(tmp_path, MINIMAL))
    assert spec.name == "demo"
    assert spec.fields.engine.llama_server.variant == "portable"
    assert spec.fields.targets == TARGETS
    assert spec.fields.platforms == ("linux", "macos", "windows")
    assert spec.fields.licenses.allow == ()
    assert spec.fields.exe.models == "auto" and spec.fields.exe.embed_limit == DEFAULT_EMBED_LIMIT
    assert spec.models["tiny"].ctx_size == 512 and spec.models["tiny"].license == "MIT"
    # relative paths start at the spec's folder, as lalo.yaml's do
    assert spec.path("tiny.gguf") == tmp_path / "tiny.gguf"


def test_full_spec(tmp_path: Path) -> None:
    text = """\
name: lalo-ai
models:
  a: {file: models/a.gguf, license: Apache-2.0, aliases: [x], parallel: 2}
engine:
  llama_server: {variant: native}
  llamafile: {runtime: rt/llamafile, sha256: %s, version: 0.9.3}
targets: [llamafile, exe]
platforms: [linux, windows]
proxy: {port: 9000, api_keys: [k1]}
resources: {ram_reserve: 2GiB}
licenses: {allow: [lfm1.0], texts: {lfm1.0: lfm.txt}}
exe: {models: beside, embed_limit: 1GiB}
""" % ("a" * 64)
    spec = parse_spec(text, source=spec_at(tmp_path, text))
    assert spec.fields.engine.llamafile.version == "0.9.3"
    assert spec.llamafile_runtime() == tmp_path / "rt" / "llamafile"
    assert spec.fields.targets == ("llamafile", "exe")
    assert spec.config.proxy.port == 9000 and [k.key for k in spec.config.proxy.api_keys] == ["k1"]
    assert spec.config.resources.ram_reserve == 2 * 1024**3
    assert spec.fields.exe.embed_limit == 1024**3
    assert spec.fields.licenses.texts == {"lfm1.0": "lfm.txt"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "extra: 1\n", ":4: extra: unknown key (known keys: name, engine, targets"),
        (MINIMAL + "engine: {llama_server: {variant: fast}}\n",
         ":4: engine.llama_server.variant: must be one of 'native' or 'portable', got 'fast'"),
        (MINIMAL + "engine: {llama_server: {path: /x}}\n",
         ":4: engine.llama_server.path: unknown key (known keys: variant)"),
        (MINIMAL + "engine:\n  llamafile: {runtime: x, sha256: abc}\n",
         ":5: engine.llamafile.sha256: must be 64 lowercase hex digits, got 'abc'"),
        (MINIMAL + "targets: [bundle, zip]\n", ":4: targets.1: must be one of"),
        (MINIMAL + "targets: []\n", ":4: targets: must not be empty"),
        (MINIMAL + "targets: [exe, exe]\n", ":4: targets: lists an item twice"),
        (MINIMAL + "exe: {embed_limit: lots}\n", ":4: exe.embed_limit: not a size: 'lots'"),
        (MINIMAL.replace("name: demo", "name: Demo App"), ":1: name: must match"),
        ("name: demo\n", "models: must name at least one model"),
        ("models: {a: {file: a.gguf}}\n", "name: is required"),
        (MINIMAL.replace("ctx_size: 512", "ctx_size: 0"), ":3: models.tiny.ctx_size: must be >= 128, got 0"),
        (MINIMAL + "proxy: {port: 0}\n", ":4: proxy.port: must be >= 1, got 0"),
        ("name: demo\nmodels:\n  a: {file: a.llamafile}\n",
         ":3: models.a.file: must be a .gguf file"),
        ("name: demo\nmodels:\n  a: {file: a.gguf, engine: llama-cpp-python}\n",
         ":3: models.a.engine: bundles run llama-server"),
        ("name: demo\nmodels: [a]\n", "models: must name at least one model"),
        ("name: [demo\n", "invalid YAML"),
    ],
)
def test_errors_name_the_file_line_and_path(tmp_path: Path, text: str, expected: str) -> None:
    message = error(tmp_path, text)
    assert message.startswith(str(tmp_path / "demo.yaml"))
    assert expected in message


def test_find_spec_by_name_or_path(tmp_path: Path) -> None:
    (tmp_path / "bundles").mkdir()
    named = spec_at(tmp_path / "bundles", MINIMAL, "mine.yaml")
    assert find_spec("mine", cwd=tmp_path) == named
    assert find_spec("bundles/mine.yaml", cwd=tmp_path) == named
    assert find_spec(str(named)) == named
    with pytest.raises(ConfigError, match=r"no bundle spec 'other'.*bundles/other\.yaml"):
        find_spec("other", cwd=tmp_path)


def test_the_shipped_lalo_ai_spec_is_refused_by_the_gate_naming_both_models() -> None:
    spec = load_spec("lalo-ai", cwd=REPO)
    assert {m.catalog for m in spec.models.values()} == {"lfm2-1.2b-tool", "lfm2-350m-extract"}
    assert spec.fields.licenses.allow == ()  # the decision: refused until someone opts in
    models = model_inputs(spec)
    assert all(m.license.id == "lfm1.0" and m.license.custom for m in models)
    with pytest.raises(LicenseError) as caught:
        gate(models)
    message = str(caught.value)
    assert "licence gate refused 2 models" in message
    assert "liquid-tool (catalog lfm2-1.2b-tool)" in message
    assert "liquid-extract (catalog lfm2-350m-extract)" in message
    assert "LFM Open License v1.0" in message and "licenses.allow" in message
    assert "# allow: [lfm1.0]" in spec.text  # the opt-in is written down, commented out


def test_naming_the_licence_lets_the_liquid_models_through(tmp_path: Path) -> None:
    text = (REPO / "bundles" / "lalo-ai.yaml").read_text().replace("allow: []", "allow: [lfm1.0]")
    spec = parse_spec(text, source=spec_at(tmp_path, text, "lalo-ai.yaml"))
    decisions = gate(model_inputs(spec))
    assert all(d.allowed and d.explicit for d in decisions)


def test_gate_refuses_a_disallowed_file_model_and_names_it(tmp_path: Path) -> None:
    text = """\
name: demo
models:
  ok: {file: a.gguf, license: Apache-2.0}
  copyleft: {file: b.gguf, license: GPL-3.0-only}
"""
    spec = parse_spec(text, source=spec_at(tmp_path, text))
    with pytest.raises(LicenseError) as caught:
        gate(model_inputs(spec))
    message = str(caught.value)
    assert message.startswith("licence gate: copyleft: GPL-3.0-only is not on the default allow-list")
    assert "ok" not in message.split(":", 2)[1]
    allowed = text + "licenses: {allow: [GPL-3.0-only]}\n"
    spec = parse_spec(allowed, source=spec_at(tmp_path, allowed))
    assert [d.explicit for d in gate(model_inputs(spec))] == [False, True]


def test_a_file_model_without_licence_is_refused(tmp_path: Path) -> None:
    text = "name: demo\nmodels:\n  mystery: {file: m.gguf}\n"
    spec = parse_spec(text, source=spec_at(tmp_path, text))
    with pytest.raises(LicenseError, match="mystery: no licence recorded"):
        gate(model_inputs(spec))


def test_a_spec_cannot_relicense_a_catalog_model(tmp_path: Path) -> None:
    text = "name: demo\nmodels:\n  t: {catalog: lfm2-1.2b-tool, license: MIT}\n"
    spec = parse_spec(text, source=spec_at(tmp_path, text))
    with pytest.raises(ConfigError, match=r"models\.t\.license: the catalog records 'lfm1\.0'"):
        model_inputs(spec)


def test_unknown_catalog_id_names_the_path(tmp_path: Path) -> None:
    text = "name: demo\nmodels:\n  t: {catalog: nope}\n"
    spec = parse_spec(text, source=spec_at(tmp_path, text))
    with pytest.raises(ConfigError, match=r"models\.t\.catalog: unknown catalog model 'nope'"):
        model_inputs(spec)
