"""Pulling through the real huggingface_hub client from a local server that speaks the hub's
download protocol (tests/integration/hub_server.py), in-process and through `lalo models`."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import pytest

from launcher.config import LoadedConfig, parse_config
from launcher.errors import HubError, IntegrityError, UsageError
from launcher.models.catalog import catalog_resolver, load_catalog, pull_missing
from launcher.models.download import RetryPolicy
from launcher.models.hub import HubClient
from launcher.models.hub_file import (
    DiskSpaceError,
    DownloadInterruptedError,
    HubFile,
    HubNotFoundError,
    HubOfflineError,
    HubSettings,
)
from launcher.models.synthetic import write_synthetic_model
from launcher.placement.resolve import resolve_models
from launcher.units import format_size
from tests.integration.hub_server import HubServer, Repo, RepoFile, Request
from tests.support.lalo import wait_until

pytestmark = pytest.mark.integration

REPO = "org/model-GGUF"
FILE = "model-Q4_K_M.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SIZE = 24 * 1024**2  # above huggingface_hub's 10 MiB write chunk, so a cut leaves a prefix
CONTENT = hashlib.sha256(b"seed").digest() * (SIZE // 32)
SHA = hashlib.sha256(CONTENT).hexdigest()
# The size of the regression's model: below the 1 MiB read chunk the transfer used to hold in
# memory, so a cut halfway kept nothing.
SMALL_FILE = "small-Q4_K_M.gguf"
SMALL = hashlib.sha256(b"small").digest() * (1_345_440 // 32)
SMALL_SHA = hashlib.sha256(SMALL).hexdigest()
ATTEMPTS = 5  # RetryPolicy's default: one pull's transfers before it gives up
CLI_TIMEOUT = 120


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_synthetic_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path.read_bytes()


@pytest.fixture
def hub(gguf_bytes: bytes) -> Iterator[HubServer]:
    repos = {
        REPO: Repo(
            commit=COMMIT,
            files={
                FILE: RepoFile(CONTENT),
                SMALL_FILE: RepoFile(SMALL),
                "tiny.gguf": RepoFile(gguf_bytes),
                "README.md": RepoFile(b"# a model card\n", lfs=False),
            },
        ),
    }
    server = HubServer(repos)
    with server.running():
        yield server


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf"


@pytest.fixture
def waits() -> list[float]:
    """The backoff delays the `client` fixture's pulls asked for (recorded, not slept)."""
    return []


@pytest.fixture
def client(hub: HubServer, hf_home: Path, waits: list[float]) -> HubClient:
    return HubClient(
        HubSettings(endpoint=hub.url, cache_dir=hf_home / "hub"), retry=RetryPolicy(sleep=waits.append)
    )


def offline(client: HubClient) -> HubClient:
    settings = client.settings
    return HubClient(HubSettings(endpoint=settings.endpoint, cache_dir=settings.cache_dir, offline=True))


class Usage(NamedTuple):
    total: int
    used: int
    free: int


class Run(NamedTuple):
    code: int
    out: str
    err: str


class Lalo(Protocol):
    def __call__(self, *args: str, **env: str) -> Run: ...


@pytest.fixture
def lalo(hub: HubServer, hf_home: Path, tmp_path: Path) -> Lalo:
    """Runs the real `lalo` CLI with HF_HOME/HF_ENDPOINT pointing at the test hub."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG, encoding="utf-8")
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
    }

    def run(*args: str, **env: str) -> Run:
        environ = {
            **inherited,
            "HF_HOME": str(hf_home),
            "HF_ENDPOINT": hub.url,
            "LALO_CATALOG": str(catalog),
            "LALO_CACHE_DIR": str(tmp_path / "lalo"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            **env,
        }
        done = subprocess.run(
            [sys.executable, "-m", "launcher", *args],
            env=environ,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        return Run(done.returncode, done.stdout, done.stderr)

    return run


CATALOG = f"""\
schema: 1
models:
  test-model:
    name: Test
    repo: {REPO}
    file: tiny.gguf
    revision: main
    file_type: F16
    size: 400000
    license: {{id: Apache-2.0, source: https://example.invalid/card}}
    base_model: org/model
    purpose: testing
    context: 4096
    default_ctx: 512
    architecture:
      name: llama
      parameters: 147776
      n_layer: 2
      n_embd: 64
      n_ff: 128
      n_head: 4
      n_head_kv: 4
      head_dim: 16
      n_vocab: 1024
      n_ctx_train: 4096
"""


def transfers(hub: HubServer, count: int) -> list[Request]:
    """The CDN GETs, once `count` are recorded (the server records a transfer after answering)."""
    wait_until(lambda: len(hub.cdn_gets()) >= count, 10.0, message=f"{count} transfers recorded")
    return hub.cdn_gets()


def blobs(client: HubClient) -> list[str]:
    directory = client.storage(HubFile(REPO, FILE)) / "blobs"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


# --- a pull, with progress ------------------------------------------------------------------
def test_pull_reports_progress_and_lays_out_the_hub_cache(client: HubClient, hub: HubServer) -> None:
    seen: list[tuple[int, int | None]] = []
    result = client.pull(HubFile(REPO, FILE), progress=lambda done, total: seen.append((done, total)))

    assert result.source == "downloaded" and result.commit == COMMIT
    assert result.sha256 == SHA and result.path.read_bytes() == CONTENT
    # huggingface_hub's own layout: snapshot link -> blob named by the LFS sha256, ref -> commit
    storage = client.storage(HubFile(REPO, FILE))
    assert result.path == storage / "snapshots" / COMMIT / FILE
    assert result.path.is_symlink() and Path(os.path.realpath(result.path)).name == SHA
    assert (storage / "refs" / "main").read_text() == COMMIT
    assert seen[0] == (0, SIZE) and seen[-1] == (SIZE, SIZE)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and len(seen) >= 3
    # the LFS file came from the CDN origin, not from the hub's
    gets = hub.cdn_gets()
    assert len(gets) == 1 and gets[0].host.startswith("localhost:")


def test_cli_pull_shows_a_progress_bar(lalo: Lalo, hf_home: Path) -> None:
    run = lalo("models", "pull", f"hf://{REPO}/{FILE}")
    assert run.code == 0, run.err
    assert "100%" in run.err and FILE in run.err  # tqdm's bar on stderr
    path = hf_home / "hub" / "models--org--model-GGUF" / "snapshots" / COMMIT / FILE
    assert f"downloaded: {path}" in run.out and SHA in run.out
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA

    again = lalo("models", "pull", f"hf://{REPO}/{FILE}", "--quiet")
    assert again.code == 0 and "already cached" in again.out and "%" not in again.err


def test_token_goes_to_the_hub_but_not_to_the_cdn(hub: HubServer, hf_home: Path) -> None:
    client = HubClient(HubSettings(endpoint=hub.url, cache_dir=hf_home / "hub", token="hf_secret"))
    client.pull(HubFile(REPO, FILE))
    head = next(r for r in hub.requests if r.method == "HEAD")
    assert head.authorization == "Bearer hf_secret"
    assert all(r.authorization is None for r in hub.cdn_gets())


def test_small_git_files_are_pulled_too(client: HubClient) -> None:
    result = client.pull(HubFile(REPO, "README.md"))
    assert result.path.read_bytes() == b"# a model card\n"


# --- interrupted transfers resume ---------------------------------------------------------
def test_transfer_cut_halfway_resumes_with_a_range_request(client: HubClient, hub: HubServer) -> None:
    hub.set_mode("cut_once")
    result = client.pull(HubFile(REPO, FILE))

    assert result.sha256 == SHA and result.path.read_bytes() == CONTENT
    first, second = transfers(hub, 2)
    assert first.range is None and 0 < first.sent < SIZE
    assert second.range is not None and second.range.startswith("bytes=")
    start = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= first.sent and second.sent == SIZE - start


def test_pull_interrupted_for_good_resumes_on_the_next_run(client: HubClient, hub: HubServer) -> None:
    hub.set_mode("cut_then_fail")
    with pytest.raises(HubError, match=r"run the pull again to resume") as failed:
        client.pull(HubFile(REPO, FILE))
    assert not isinstance(failed.value, IntegrityError)
    partial = client.partial_path(HubFile(REPO, FILE), SHA)
    kept = partial.stat().st_size
    assert 0 < kept < SIZE
    assert client.cached_path(HubFile(REPO, FILE)) is None  # nothing half-done where lalo loads

    # the cut transfer and the retries answered 500: the server records each after answering
    wait_until(lambda: len(hub.cdn_gets()) == ATTEMPTS, 10.0, message="every transfer recorded")
    hub.set_mode("normal")
    before = len(hub.cdn_gets())
    result = client.pull(HubFile(REPO, FILE))

    assert result.resumed_from == kept and result.sha256 == SHA
    resumed = hub.cdn_gets()[before:]
    assert [r.range for r in resumed] == [f"bytes={kept}-"] and resumed[0].sent == SIZE - kept
    assert not partial.exists()


def test_cli_pull_cut_halfway_resumes_in_the_same_command(lalo: Lalo, hub: HubServer, hf_home: Path) -> None:
    """The regression of issue 27: a 1.28 MiB file cut halfway failed the first command with
    0 B kept; now the one command resumes from the bytes received and says so."""
    hub.set_mode("cut_once")
    run = lalo("models", "pull", f"hf://{REPO}/{SMALL_FILE}")

    assert run.code == 0, run.err
    first, second = transfers(hub, 2)
    half = len(SMALL) // 2
    assert first.range is None and first.sent == half
    assert second.range == f"bytes={half}-" and second.sent == len(SMALL) - half
    assert (
        f"hf://{REPO}/{SMALL_FILE}@main: connection dropped after {format_size(half)} of "
        f"{format_size(len(SMALL))}; resuming from {format_size(half)} in 1 s (attempt 2 of 5)"
    ) in run.err
    path = hf_home / "hub" / "models--org--model-GGUF" / "snapshots" / COMMIT / SMALL_FILE
    assert f"downloaded: {path}" in run.out and SMALL_SHA in run.out
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SMALL_SHA


@pytest.mark.parametrize(("name", "content"), [(SMALL_FILE, SMALL), (FILE, CONTENT)])
def test_transfer_cut_at_random_points_completes_in_one_pull(
    client: HubClient, hub: HubServer, waits: list[float], name: str, content: bytes
) -> None:
    # Four cuts, the first right after the headers (nothing of the body arrives), the others
    # at random points; the fifth transfer is whole.
    fractions = [0.0, *(random.Random(27).uniform(0.01, 0.99) for _ in range(3))]
    hub.cut_next(fractions)
    result = client.pull(HubFile(REPO, name))

    assert result.sha256 == hashlib.sha256(content).hexdigest() and result.path.read_bytes() == content
    assert result.attempts == ATTEMPTS and result.resumed_from == 0
    assert waits == [1.0, 2.0, 4.0, 8.0]
    gets = transfers(hub, ATTEMPTS)
    assert len(gets) == ATTEMPTS and sum(get.sent for get in gets) == len(content)
    offset = 0
    for get in gets:  # each transfer starts at exactly the bytes received before it
        assert get.range == (f"bytes={offset}-" if offset else None)
        offset += get.sent


def test_a_server_that_cuts_every_transfer_fails_then_the_next_pull_resumes(
    client: HubClient, hub: HubServer, waits: list[float]
) -> None:
    hub.set_mode("cut_always")
    with pytest.raises(DownloadInterruptedError) as failed:
        client.pull(HubFile(REPO, FILE))

    gets = transfers(hub, ATTEMPTS)
    kept = sum(get.sent for get in gets)
    partial = client.partial_path(HubFile(REPO, FILE), SHA)
    assert len(gets) == ATTEMPTS and waits == [1.0, 2.0, 4.0, 8.0]
    assert partial.stat().st_size == kept and 0 < kept < SIZE  # every byte received is kept
    message = str(failed.value)
    assert f"download interrupted after {format_size(kept)} of {format_size(SIZE)} in 5 attempts" in message
    assert f"run the pull again to resume (lalo models pull hf://{REPO}/{FILE}@main)" in message
    assert client.cached_path(HubFile(REPO, FILE)) is None

    hub.set_mode("normal")
    result = client.pull(HubFile(REPO, FILE))

    assert result.resumed_from == kept and result.attempts == 1 and result.sha256 == SHA
    resumed = transfers(hub, ATTEMPTS + 1)[ATTEMPTS:]
    assert [get.range for get in resumed] == [f"bytes={kept}-"] and resumed[0].sent == SIZE - kept
    assert not partial.exists()


def test_a_resumed_download_that_does_not_verify_is_deleted(client: HubClient, hub: HubServer) -> None:
    hub.set_mode("cut_then_fail")
    with pytest.raises(DownloadInterruptedError):
        client.pull(HubFile(REPO, FILE))
    partial = client.partial_path(HubFile(REPO, FILE), SHA)
    kept = partial.stat().st_size
    with partial.open("r+b") as stream:  # the kept prefix went bad on disk
        stream.write(b"\0" * 16)

    transfers(hub, ATTEMPTS)
    hub.set_mode("normal")
    with pytest.raises(IntegrityError, match=rf"resumed from {format_size(kept)} an earlier pull had kept"):
        client.pull(HubFile(REPO, FILE))
    assert blobs(client) == [] and client.cached_path(HubFile(REPO, FILE)) is None

    again = client.pull(HubFile(REPO, FILE))  # the next pull starts over and verifies
    assert again.resumed_from == 0 and again.sha256 == SHA


# --- integrity ------------------------------------------------------------------------------
def test_corrupted_bytes_are_detected_and_nothing_bad_is_left(client: HubClient, hub: HubServer) -> None:
    hub.set_mode("corrupt")
    with pytest.raises(IntegrityError, match=f"expected {SHA}"):
        client.pull(HubFile(REPO, FILE))
    assert client.cached_path(HubFile(REPO, FILE)) is None
    assert blobs(client) == []  # no blob, no partial
    assert not (client.storage(HubFile(REPO, FILE)) / "snapshots" / COMMIT / FILE).exists()


def test_cli_reports_corruption_in_one_line(lalo: Lalo, hub: HubServer) -> None:
    hub.set_mode("corrupt")
    run = lalo("models", "pull", f"hf://{REPO}/{FILE}", "--quiet")
    assert run.code == 1
    errors = [line for line in run.err.splitlines() if line.startswith("lalo: error:")]
    assert len(errors) == 1 and "sha256" in errors[0] and "deleted" in errors[0]
    assert "Traceback" not in run.err


def test_a_catalog_pin_the_hub_does_not_match_is_refused_before_downloading(
    client: HubClient, hub: HubServer
) -> None:
    with pytest.raises(IntegrityError, match=r"catalog pins"):
        client.pull(HubFile(REPO, FILE, sha256="0" * 64))
    assert hub.cdn_gets() == []


def test_a_corrupted_cached_blob_is_replaced(client: HubClient, hub: HubServer) -> None:
    first = client.pull(HubFile(REPO, FILE))
    blob = Path(os.path.realpath(first.path))
    with blob.open("r+b") as stream:
        stream.write(b"\0" * 16)

    second = client.pull(HubFile(REPO, FILE))

    assert second.source == "downloaded" and second.path.read_bytes() == CONTENT
    assert len(hub.cdn_gets()) == 2


def test_no_download_starts_without_disk_space(hub: HubServer, hf_home: Path) -> None:
    def nearly_full(path: str) -> Usage:
        return Usage(total=10**12, used=10**12 - 1024**2, free=1024**2)

    client = HubClient(HubSettings(endpoint=hub.url, cache_dir=hf_home / "hub"), disk_usage=nearly_full)
    with pytest.raises(DiskSpaceError, match=r"not enough disk space"):
        client.pull(HubFile(REPO, FILE))
    assert hub.cdn_gets() == []


# --- offline --------------------------------------------------------------------------------
def test_offline_with_a_cached_file_uses_it_and_says_so(client: HubClient, hub: HubServer) -> None:
    client.pull(HubFile(REPO, FILE))
    requests = len(hub.requests)

    result = offline(client).pull(HubFile(REPO, FILE))

    assert result.source == "offline-cache" and result.note is not None and "offline" in result.note
    assert result.path.read_bytes() == CONTENT and len(hub.requests) == requests


def test_offline_without_a_cached_file_is_a_clear_error(client: HubClient, hub: HubServer) -> None:
    with pytest.raises(HubOfflineError, match=r"offline .*not in the cache"):
        offline(client).pull(HubFile(REPO, FILE))
    assert hub.requests == []


def test_cli_offline(lalo: Lalo) -> None:
    missing = lalo("models", "pull", f"hf://{REPO}/{FILE}", HF_HUB_OFFLINE="1")
    assert missing.code == 1
    assert missing.err.startswith("lalo: error: offline (HF_HUB_OFFLINE is set), and hf://")

    assert lalo("models", "pull", f"hf://{REPO}/{FILE}", "-q").code == 0
    cached = lalo("models", "pull", f"hf://{REPO}/{FILE}", HF_HUB_OFFLINE="1")
    assert cached.code == 0
    assert "offline (HF_HUB_OFFLINE is set): using the cached copy" in cached.err


def test_unreachable_hub_falls_back_to_the_cache(client: HubClient, hub: HubServer) -> None:
    client.pull(HubFile(REPO, FILE))
    hub.stop()
    result = client.pull(HubFile(REPO, FILE))
    assert result.source == "offline-cache" and "cannot reach the hub" in (result.note or "")
    with pytest.raises(HubOfflineError, match=r"cannot reach the hub"):
        client.pull(HubFile(REPO, "README.md"))


# --- unknown repositories, files and revisions -----------------------------------------------
@pytest.mark.parametrize(
    ("file", "message"),
    [
        (HubFile("org/nope", FILE), "repository 'org/nope' not found"),
        (HubFile(REPO, "missing.gguf"), "file 'missing.gguf' not found in org/model-GGUF"),
        (HubFile(REPO, FILE, revision="v9"), "revision 'v9' not found in org/model-GGUF"),
    ],
)
def test_unknown_things_are_clear_errors(client: HubClient, file: HubFile, message: str) -> None:
    with pytest.raises(HubNotFoundError, match=message):
        client.pull(file)


def test_cli_unknown_repo_and_model(lalo: Lalo) -> None:
    run = lalo("models", "pull", "hf://org/nope/x.gguf")
    assert run.code == 1 and run.err.strip().startswith("lalo: error: repository 'org/nope' not found")
    bad = lalo("models", "pull", "no-such-model")
    assert bad.code == 2 and "unknown model 'no-such-model'" in bad.err


def test_hf_references_parse() -> None:
    assert HubFile.parse("hf://a/b/dir/f.gguf@v1") == HubFile("a/b", "dir/f.gguf", "v1")
    assert HubFile.parse("hf://a/b/f.gguf", revision="abc").revision == "abc"
    with pytest.raises(UsageError):
        HubFile.parse("hf://a/f.gguf")


# --- the catalog: resolver, `lalo up`'s pull, list and rm ---------------------------------------
def test_catalog_models_resolve_to_the_cached_file(client: HubClient, tmp_path: Path) -> None:
    catalog_file = tmp_path / "catalog.yaml"
    catalog_file.write_text(CATALOG, encoding="utf-8")
    catalog = load_catalog(catalog_file)
    loaded = LoadedConfig(
        parse_config(
            "models:\n  t: {catalog: test-model, ctx_size: 512}\n",
            label="lalo.yaml",
            total_ram=64 * 1024**3,
        ),
        None,
    )
    resolver = catalog_resolver(catalog, client)

    before = resolve_models(loaded, catalog=resolver)[0]
    assert before.path is None and before.facts is not None
    assert before.facts.n_layer == 2  # estimated from the catalog alone

    with pytest.raises(HubOfflineError, match=r"models.t: catalog model 'test-model' is not downloaded"):
        pull_missing(loaded, catalog=catalog, client=offline(client))
    pulled = pull_missing(loaded, catalog=catalog, client=client, show_progress=False)
    assert list(pulled) == ["t"]

    after = resolve_models(loaded, catalog=resolver)[0]
    assert after.path == pulled["t"].path and after.info is not None
    assert after.info.is_synthetic
    assert pull_missing(loaded, catalog=catalog, client=client) == {}  # nothing left to pull


def test_cli_list_and_rm(lalo: Lalo) -> None:
    listed = lalo("models", "list")
    assert listed.code == 0 and "test-model" in listed.out and "Apache-2.0" in listed.out
    assert lalo("models", "pull", "test-model", "-q").code == 0
    assert lalo("models", "pull", f"hf://{REPO}/{FILE}", "-q").code == 0
    listed = lalo("models", "list", "--json")
    data = json.loads(listed.out)
    assert data["models"][0]["cached"] is True
    assert [o["ref"] for o in data["other_cached"]] == [f"hf://{REPO}/{FILE}@{COMMIT}"]

    removed = lalo("models", "rm", "test-model", "--yes")
    assert removed.code == 0 and "removed 2 cache entries" in removed.out
    assert json.loads(lalo("models", "list", "--json").out)["models"][0]["cached"] is False
    refused = lalo("models", "rm", f"hf://{REPO}/{FILE}")  # no tty, no --yes
    assert refused.code == 2 and "--yes" in refused.err


def test_settings_follow_the_environment_huggingface_hub_uses(tmp_path: Path) -> None:
    settings = HubSettings.from_env(
        {
            "HF_HOME": str(tmp_path / "home"),
            "HF_ENDPOINT": "http://mirror.invalid/",
            "HF_TOKEN": "t",
            "HF_HUB_OFFLINE": "1",
        }
    )
    assert settings == HubSettings(
        endpoint="http://mirror.invalid", cache_dir=tmp_path / "home" / "hub", token="t", offline=True
    )
    cache = HubSettings.from_env({"HF_HOME": "/x", "HF_HUB_CACHE": str(tmp_path / "c")}).cache_dir
    assert cache == tmp_path / "c"
    default = HubSettings.from_env({"XDG_CACHE_HOME": str(tmp_path)})
    assert default.cache_dir == tmp_path / "huggingface" / "hub" and not default.offline
    assert default.endpoint == "https://huggingface.co" and default.token is None


def test_lalo_up_pulls_a_missing_catalog_model_then_serves_it(
    hub: HubServer, hf_home: Path, tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
) -> None:
    import httpx

    from tests.support.lalo import LaloUp, write_config

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG, encoding="utf-8")
    env = {**isolated, "HF_HOME": str(hf_home), "HF_ENDPOINT": hub.url,
           "LALO_CATALOG": str(catalog), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    config = write_config(tmp_path / "lalo.yaml", {"t": {"catalog": "test-model", "ctx_size": 512}},
                          engines={"llama_server": {"path": str(llama_server_bin)}})
    with LaloUp(config, env) as up:
        up.wait_state("t", "ready")
        assert "t: test-model is not downloaded yet: pulling org/model-GGUF/tiny.gguf" in up.output()
        reply = httpx.post(up.url + "/v1/completions", timeout=60,
                           json={"model": "t", "prompt": "hi", "max_tokens": 3})
        assert reply.status_code == 200, reply.text
    # offline now, with the file cached: it starts without the hub
    with LaloUp(config, {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}) as up:
        up.wait_state("t", "ready")
