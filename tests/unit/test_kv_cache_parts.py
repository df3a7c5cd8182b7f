"""`kv_cache: f16 | q8_0 | q4_0` per model: validated at load, passed to llama-server as -ctk/-ctv
with flash attention, and counted by every estimate (plan, k8s sizing, the Windows table)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from launcher.config import ModelConfig, parse_config
from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.errors import ConfigError
from launcher.models.catalog import default_catalog
from launcher.models.shape import KV_TYPE_BYTES
from launcher.packaging.targets.k8s_sizing import model_memory as k8s_memory
from launcher.packaging.targets.k8s_sizing import size_pod
from launcher.packaging.windows import presets
from launcher.placement.estimate import MemorySettings, estimate_for, estimate_memory
from launcher.placement.measurements import measurement_key
from launcher.placement.planner import Budget, Candidate, make_plan
from launcher.supervisor.prompt_cache import cache_key

MIB = 1024**2
SMOL = default_catalog().get("smollm2-135m-instruct").facts()
GEMMA = default_catalog().get("gemma-3-270m").facts()


def model(kv_cache: str, **extra: object) -> ModelConfig:
    return parse_config(f"models:\n  m: {{file: m.gguf, kv_cache: {kv_cache}, "
                        + "".join(f"{k}: {v}, " for k, v in extra.items()) + "}\n",
                        label="lalo.yaml").models["m"]


def test_kv_cache_is_f16_by_default_and_takes_the_three_types() -> None:
    assert ModelConfig(file="m.gguf").kv_cache == "f16"
    for kind in ("f16", "q8_0", "q4_0"):
        assert model(kind).kv_cache == kind


@pytest.mark.parametrize(("text", "message"), [
    ("models:\n  m:\n    file: m.gguf\n    kv_cache: q5_1\n",
     "lalo.yaml:4: models.m.kv_cache: must be one of 'f16', 'q8_0' or 'q4_0', got 'q5_1'"),
    ("models:\n  m:\n    file: m.llamafile\n    kv_cache: q8_0\n",
     "lalo.yaml:2: models.m: kv_cache q8_0 needs engine llama-server (lalo passes no KV cache "
     "type to llamafile): use f16 or that engine"),
    ("models:\n  m:\n    file: m.gguf\n    engine: llama-cpp-python\n    kv_cache: q4_0\n",
     "lalo.yaml:2: models.m: kv_cache q4_0 needs engine llama-server (lalo passes no KV cache "
     "type to llama-cpp-python): use f16 or that engine"),
])
def test_bad_kv_cache_is_one_config_error_naming_the_model(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, label="lalo.yaml")
    assert str(caught.value) == message


@pytest.mark.parametrize("facts", [SMOL, GEMMA], ids=["smollm2", "gemma3"])
def test_estimate_counts_each_kv_type_at_its_width(facts: object) -> None:
    assert KV_TYPE_BYTES["q8_0"] == 34 / 32 and KV_TYPE_BYTES["q4_0"] == 18 / 32
    f16 = estimate_memory(facts, 8192, 1, "f16")  # type: ignore[arg-type]
    for kind in ("q8_0", "q4_0"):
        quantized = estimate_memory(facts, 8192, 1, kind)  # type: ignore[arg-type]
        ratio = KV_TYPE_BYTES[kind] / 2
        # the cache and the sliding-window checkpoints shrink by the type's width, nothing else
        assert quantized.kv_cache == pytest.approx(f16.kv_cache * ratio, abs=2)
        assert quantized.checkpoints == pytest.approx(f16.checkpoints * ratio, abs=2)
        assert quantized.total - quantized.kv_cache - quantized.checkpoints == (
            f16.total - f16.kv_cache - f16.checkpoints)
    # SmolLM2 at ctx 8192: 30 layers x 3 KV heads x (64 + 64) x 8192 cells
    if facts is SMOL:
        assert f16.kv_cache == 30 * 3 * 128 * 8192 * 2 == 180 * MIB
        assert estimate_memory(SMOL, 8192, 1, "q8_0").kv_cache == 180 * MIB * 17 // 32
        assert estimate_memory(SMOL, 8192, 1, "q4_0").kv_cache == 180 * MIB * 9 // 32


def test_memory_settings_of_a_model_carry_its_kv_cache() -> None:
    settings = MemorySettings.of(model("q8_0", ctx_size=4096, parallel=2))
    assert (settings.ctx_size, settings.parallel, settings.kv_type) == (4096, 2, "q8_0")
    assert estimate_for(SMOL, settings) == estimate_memory(SMOL, 4096, 2, "q8_0")
    assert settings.key() == "kv=q8_0" and settings.note() == "kv_cache q8_0"
    assert MemorySettings(2048).key() == "" and MemorySettings(2048).note() == ""


def test_llama_server_gets_ctk_ctv_and_flash_attention_for_a_quantized_cache(tmp_path: Path) -> None:
    base = ServerSettings(model_path=tmp_path / "m.gguf", host="127.0.0.1", port=1, api_key="k",
                          ctx_size=2048, parallel=1, threads=None)
    engine = LlamaServerEngine(Path("/opt/llama-server"))
    plain = engine.launch_spec(base).argv
    assert not {"--cache-type-k", "--cache-type-v", "--flash-attn"} & set(plain)
    for kind in ("q8_0", "q4_0"):
        argv = list(engine.launch_spec(replace(base, kv_cache=kind)).argv)
        at = argv.index("--cache-type-k")
        # K and V alike; llama-server refuses a quantized V without flash attention
        assert argv[at:at + 6] == ["--cache-type-k", kind, "--cache-type-v", kind,
                                   "--flash-attn", "on"]


def test_slot_files_and_measurements_are_kept_apart_per_kv_type(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    # a slot file saved from an f16 cache cannot fill a q8_0 one
    assert cache_key(path, None, 2048, 1, ()) != cache_key(
        path, None, 2048, 1, ("--cache-type-k", "q8_0", "--cache-type-v", "q8_0"))
    # the RSS measured at f16 is not the plan's figure at q8_0; f16 keys stay as they were
    f16 = measurement_key(path, "llama-server", 2048, 1, MemorySettings(2048).key())
    assert f16 == measurement_key(path, "llama-server", 2048, 1)
    assert f16 != measurement_key(path, "llama-server", 2048, 1, MemorySettings(2048, 1, "q8_0").key())


def test_plan_shows_the_kv_cache_and_suggests_it_when_a_model_does_not_fit() -> None:
    settings = MemorySettings(8192, 1, "q8_0")
    need = estimate_for(SMOL, settings).total
    plan = make_plan([Candidate("m", need, True, facts=SMOL, ctx_size=8192, settings=settings)],
                     Budget(need + MIB, "t"))
    decision = plan.decision("m")
    assert decision.action == "start" and "(estimated, kv_cache q8_0)" in decision.reason
    row = plan.to_json()["models"][0]  # type: ignore[index]
    assert (row["ctx_size"], row["parallel"], row["kv_cache"]) == (8192, 1, "q8_0")
    # at f16 the same budget is too small; q8_0 is the hint that keeps the context
    f16 = estimate_memory(SMOL, 8192).total
    short = make_plan([Candidate("m", f16, True, facts=SMOL, ctx_size=8192)],
                      Budget(need + MIB, "t")).decision("m")
    assert short.action == "cannot-fit"
    assert "kv_cache: q8_0 would fit at ctx_size 8192" in short.suggestions


def test_packaging_targets_size_the_quantized_cache(tmp_path: Path) -> None:
    config = parse_config("models:\n  a: {file: a.gguf, ctx_size: 8192, kv_cache: q4_0}\n"
                          "  b: {file: b.gguf, ctx_size: 8192}\n", label="x")
    a, b = config.models["a"], config.models["b"]
    # k8s: the memory request is lalo's estimate with the model's kv_cache
    pod = size_pod(config, {"a": SMOL, "b": SMOL}, {"a": 1, "b": 1}, cpus_per_auto_model=1)
    sizes = {m.name: m.memory for m in pod.models}
    assert sizes["a"] == k8s_memory(SMOL, a) < sizes["b"] == k8s_memory(SMOL, b)
    assert sizes["b"] - sizes["a"] == 180 * MIB - 180 * MIB * 9 // 32
    # Windows: the RAM table and the presets say the same
    assert presets.model_memory(SMOL, a) < presets.model_memory(SMOL, b)
    assert presets.model_memory(SMOL, a) == estimate_for(
        SMOL, MemorySettings.of(a), presets.WINDOWS_REPACK).total + presets.ROUTER_MEMORY


def test_windows_presets_carry_cache_type_keys(tmp_path: Path, small_model: Path) -> None:
    import yaml

    from launcher.packaging.spec import load_spec

    path = tmp_path / "duo.yaml"
    path.write_text(yaml.safe_dump({"name": "duo", "models": {
        "a": {"file": str(small_model), "license": "MIT"}}}))
    packed = [presets.PackedModel(name=name, config=ModelConfig(file="x.gguf", kv_cache=kind),
                                  file=f"models/{name}.gguf", memory=MIB)
              for name, kind in (("quick", "q8_0"), ("plain", "f16"))]
    sections = presets.presets_ini(load_spec(str(path)), packed).split("\n[")
    quick = next(s for s in sections if s.startswith("quick]")).splitlines()
    plain = next(s for s in sections if s.startswith("plain]"))
    assert {"cache-type-k = q8_0", "cache-type-v = q8_0", "flash-attn = on"} <= set(quick)
    assert "cache-type" not in plain and "flash-attn" not in plain


def test_lalo_up_builds_the_server_and_its_record_with_the_kv_cache(
    tmp_path: Path, small_model: Path, isolated: dict[str, str]
) -> None:
    from launcher.config import LoadedConfig
    from launcher.placement.cpu_share import CpuShare
    from launcher.placement.resolve import resolve_models
    from launcher.serve.factory import ServerFactory
    from launcher.supervisor.events import SupervisorEvents
    from launcher.supervisor.instance import ChildRecords

    text = f"models:\n  q: {{file: {small_model}, ctx_size: 1024, kv_cache: q4_0}}\n"
    loaded = LoadedConfig(parse_config(text, label="x"), tmp_path / "x.yaml")
    (resolved,) = resolve_models(loaded)
    assert resolved.estimate is not None and resolved.facts is not None
    assert resolved.estimate == estimate_memory(resolved.facts, 1024, 1, "q4_0")
    factory = ServerFactory(loaded, {"llama-server": LlamaServerEngine(Path("/bin/llama-server"))},
                            SupervisorEvents(ChildRecords(tmp_path)), CpuShare(1, 1, 2))
    meta, managed, _ = factory.make(resolved)
    argv = list(managed.engine.launch_spec(managed.settings).argv)
    assert argv[argv.index("--cache-type-k") + 1] == argv[argv.index("--cache-type-v") + 1] == "q4_0"
    # /api/status shows what the estimate was made with; the measured peak is kept per KV type
    assert (meta.kv_cache, meta.ctx_size, meta.estimate) == ("q4_0", 1024, resolved.estimate.total)
    assert meta.measurement_key.endswith("|kv=q4_0")
