"""`lalo doctor` on this machine, and `--bench` on one small catalog model when an engine exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from launcher.doctor.report import TIERS, machine_tier
from launcher.engines.registry import find_llama_server, find_tool, list_engines
from launcher.models.catalog import default_catalog

pytestmark = pytest.mark.integration

GIB = 1024**3
BENCH_MODEL = "lfm2-350m-extract"  # the smallest catalog model: ~230 MB at Q4_K_M


def lalo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


def test_doctor_json_describes_this_machine() -> None:
    done = lalo("doctor", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)

    assert data["cpu"]["logical_cores"] == psutil.cpu_count(logical=True)
    assert data["cpu"]["physical_cores"] == (psutil.cpu_count(logical=False) or psutil.cpu_count())
    flags = cpu_flags()
    for feature in ("avx", "avx2", "avx512f", "fma"):
        if flags:
            assert (feature in data["cpu"]["features"]) == (feature in flags), feature
    assert data["ram_total"] == psutil.virtual_memory().total
    # available RAM moves while the test runs: the budget is available minus the 1 GiB reserve
    expected_budget = psutil.virtual_memory().available - GIB
    assert abs(data["budget"]["bytes"] - expected_budget) < GIB // 2
    assert data["disk_free"] > 0 and Path(data["disk_path"]).exists()
    assert [e["path"] for e in data["engines"]] == [str(e.path) for e in list_engines()]

    catalog = default_catalog()
    assert [m["id"] for m in data["models"]] == list(catalog.entries)
    for model in data["models"]:
        entry = catalog.get(model["id"])
        assert model["ctx_size"] == entry.default_ctx
        assert model["estimate"] > entry.size
        assert model["fits_now"] == (model["estimate"] <= data["budget"]["bytes"])
    assert set(data["fit_together"]) <= set(catalog.entries)
    tier = machine_tier(data["ram_total"], data["cpu"]["physical_cores"])
    assert (data["tier"] or {}).get("name") == (tier.name if tier else None)


def test_doctor_text_names_hardware_engines_and_every_model() -> None:
    done = lalo("doctor")
    assert done.returncode == 0, done.stderr
    for label in ("cpu ", "features ", "ram ", "disk ", "engine ", "tier "):
        assert any(line.startswith(label) for line in done.stdout.splitlines()), label
    for model_id in default_catalog().entries:
        assert model_id in done.stdout
    assert "loaded together now:" in done.stdout


def test_tiers_follow_ram_and_cores() -> None:
    assert machine_tier(4 * GIB, 4) is None
    assert machine_tier(8 * GIB, 2) is TIERS[0]
    assert machine_tier(int(15.5 * GIB), 8) is TIERS[1]  # a "16 GB" machine reports less
    assert machine_tier(64 * GIB, 4) is TIERS[0]  # RAM alone is not enough: cores too
    assert machine_tier(512 * GIB, 64) is TIERS[-1]


@pytest.mark.timeout(900)
def test_doctor_bench_measures_one_small_model() -> None:
    engine = find_llama_server()
    if engine is None:
        pytest.skip(
            "no llama-server in the registry (config, lalo's cache or PATH): "
            "run `lalo engine build` to enable the benchmark test"
        )
    if find_tool(engine, "llama-quantize") is None:
        pytest.skip(f"no llama-quantize beside {engine.path}: the benchmark needs it for Q4_K_M")

    done = lalo("doctor", "--bench", "--model", BENCH_MODEL, "--tokens", "32", "--json", timeout=840)
    assert done.returncode == 0, done.stderr
    bench = json.loads(done.stdout)["bench"]
    assert bench["random_weights"] is True and bench["engine"] == str(engine.path)
    (result,) = bench["results"]
    assert result["error"] is None, result["error"]
    assert result["model_id"] == BENCH_MODEL and result["file_type"] == "Q4_K_M"
    assert result["tokens"] >= 32 and result["decode_tok_s"] > 1
    assert result["server_decode_tok_s"] > 1
    # the synthetic model is cached for the next run, and its file says what it is
    path = Path(result["model_path"])
    assert path.is_file() and "bench-lfm2-350m-q4_k_m" in path.name
    assert os.path.getsize(path) == result["synthetic_size"]
    assert "random-weight" in done.stderr or "measuring decode speed" in done.stderr
