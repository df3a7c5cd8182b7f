"""`lalo build --target image` for real: buildah builds the OCI archive from the bundle (the
real SmolLM2-135M inside), twice, byte for byte the same; its layout is checked (user,
entrypoint, command, port, health-check label, every bundle file with its sha256 from the
bundle manifest); then podman loads and runs it (`--runtime runc`, ulimits under the hard
limits: FACTS.md, "Containers") and the container answers a chat completion through a port
published on 127.0.0.1 only. Containers, images and port mappings made here are removed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from launcher.packaging.build import BuildResult, Packager
from launcher.packaging.spec import load_spec
from launcher.packaging.targets.image_layout import GID, UID
from tests.support.engine import test_engine_variant
from tests.support.firewall import firewall_as_it_was, firewall_rules
from tests.support.lalo import free_port, wait_until

pytest.importorskip("PyInstaller", reason="pip install 'lalo-launcher[packaging]' for these")
for _tool in ("buildah", "podman", "runc"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} is not installed (apt-get install buildah podman runc)",
                    allow_module_level=True)

PORT = 8080  # inside the container
START_TIMEOUT = 180.0
# root in this VM lacks CAP_SYS_RESOURCE and crun refuses hybrid cgroups (FACTS.md)
RUN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _variant() -> str:
    return test_engine_variant()  # the engine the other tests run: one build in CI


pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]


@dataclass(frozen=True)
class Built:
    result: BuildResult
    again: BuildResult
    out: Path
    seconds: float
    seconds_again: float


def write_spec(folder: Path, model: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "smol.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "smol",
        "models": {"smol": {"file": str(model), "license": "Apache-2.0", "ctx_size": 1024,
                            "threads": 2, "aliases": ["tiny"]}},
        "targets": ["image"],
        "platforms": ["linux"],
        "proxy": {"port": PORT},
        "image": {"tag": f"test-{uuid.uuid4().hex[:8]}"},  # never clobbers a user's image
        "engine": {"llama_server": {"variant": _variant()}},
    }, sort_keys=False))
    return spec


def build(spec: Path, out: Path) -> tuple[BuildResult, float]:
    lines: list[str] = []
    started = time.monotonic()
    try:
        result = Packager(report=lines.append).build(load_spec(str(spec)), out, ["image"])
    except Exception:
        print("\n".join(lines))
        raise
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Built:
    folder = tmp_path_factory.mktemp("image")
    spec = write_spec(folder, smollm2)
    result, seconds = build(spec, folder / "dist")
    again, seconds_again = build(spec, folder / "dist2")
    print(f"\nimage build: {seconds:.1f} s (bundle cached: {seconds_again:.1f} s); archive "
          f"{result.image.archive_size if result.image else 0} bytes")
    return Built(result, again, folder / "dist", seconds, seconds_again)


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done


def wait_answering(url: str, name: str, what: str, interval: float = 0.1) -> None:
    """Until GET `url` answers 200; the container `name` must stay running meanwhile (its log
    is the failure message when it does not)."""
    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", podman("logs", name, check=False).stderr
            return False

    wait_until(answers, START_TIMEOUT, interval=interval, message=what)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Layout:
    """The OCI layout inside the archive: index, manifest, config and the one layer."""

    def __init__(self, archive: Path) -> None:
        self.tar = tarfile.open(archive)
        self.index = self.json("index.json")
        self.manifest = self.json(self.blob_path(self.index["manifests"][0]["digest"]))
        self.config = self.json(self.blob_path(self.manifest["config"]["digest"]))

    @staticmethod
    def blob_path(digest: str) -> str:
        algorithm, hexdigest = digest.split(":")
        return f"blobs/{algorithm}/{hexdigest}"

    def read(self, name: str) -> bytes:
        member = self.tar.extractfile(name)
        assert member is not None, name
        return member.read()

    def json(self, name: str) -> Any:
        return json.loads(self.read(name))

    def layer(self) -> tarfile.TarFile:
        (layer,) = self.manifest["layers"]
        data = self.read(self.blob_path(layer["digest"]))
        if layer["mediaType"].endswith("gzip"):
            data = gzip.decompress(data)
        return tarfile.open(fileobj=io.BytesIO(data))


def test_the_same_inputs_give_the_same_archive(built: Built) -> None:
    first, second = built.result.image, built.again.image
    assert first is not None and second is not None
    assert first.archive == built.out / "smol.oci.tar"
    assert first.digest == second.digest
    assert first.archive.read_bytes() == second.archive.read_bytes()
    # the archive's own entries: sorted, mtime 0, numeric owners
    with tarfile.open(first.archive) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
    # the build leaves nothing in the machine's image store
    assert first.reference not in podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout


def test_image_layout(built: Built) -> None:
    image = built.result.image
    bundle = built.result.bundle
    assert image is not None and bundle is not None
    layout = Layout(image.archive)
    assert layout.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] \
        == image.reference
    config = layout.config["config"]
    assert config["User"] == f"{UID}:{GID}"
    assert config["Entrypoint"] == ["/app/lalo/lalo"]
    assert config["Cmd"] == ["up", "--host", "0.0.0.0", "--insecure"]
    assert config["ExposedPorts"] == {f"{PORT}/tcp": {}}
    assert json.loads(config["Labels"]["ai.lalo.healthcheck"]) == ["/app/lalo/lalo", "--probe",
                                                                   "/health"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["LALO_CONFIG"] == "/etc/lalo/lalo.yaml"
    assert layout.config["created"].startswith("1970-01-01")
    layer = layout.layer()
    members = {m.name.lstrip("./"): m for m in layer.getmembers()}
    manifest = json.loads((bundle.directory / "manifest.json").read_text())
    for entry in manifest["files"]:
        member = members[f"app/{entry['path']}"]
        if "link" in entry:
            assert member.issym() and member.linkname == entry["link"]
            continue
        handle = layer.extractfile(member)
        assert handle is not None
        assert sha256(handle.read()) == entry["sha256"], entry["path"]
        assert (member.uid, member.gid) == (0, 0)  # the app is not writable by the user
    for folder in ("var/lib/lalo", "home/lalo"):
        assert (members[folder].uid, members[folder].gid) == (UID, GID)
    assert members["tmp"].mode & 0o1777 == 0o1777
    assert "lib64/ld-linux-x86-64.so.2" in members
    passwd = layer.extractfile(members["etc/passwd"])
    assert passwd is not None and f"lalo:x:{UID}:{GID}:" in passwd.read().decode()
    image_config = layer.extractfile(members["etc/lalo/lalo.yaml"])
    assert image_config is not None
    assert f"/app/models/{manifest['models'][0]['file'].split('/')[-1]}" in \
        image_config.read().decode()


@pytest.fixture(scope="module")
def network_state() -> Iterator[None]:
    """Leave the firewall as it was (tests/support/firewall.py)."""
    with firewall_as_it_was() as before:
        yield
    assert firewall_rules() == before


@pytest.fixture
def loaded(built: Built, network_state: None) -> Iterator[str]:
    image = built.result.image
    assert image is not None
    done = podman("load", "-i", str(image.archive))
    assert image.reference in done.stdout + done.stderr
    try:
        yield image.reference
    finally:
        podman("rmi", "--force", image.reference, check=False)


def test_the_container_answers_a_chat_completion(built: Built, loaded: str) -> None:
    name = f"lalo-test-{uuid.uuid4().hex[:8]}"
    host_port = free_port()
    url = f"http://127.0.0.1:{host_port}"
    started = time.monotonic()
    podman("run", "-d", "--name", name, *RUN_FLAGS, "-p", f"127.0.0.1:{host_port}:{PORT}",
           loaded)
    try:
        wait_answering(url + "/health", name, "the container's /health")
        to_health = time.monotonic() - started
        response = httpx.post(url + "/v1/chat/completions", timeout=120.0, trust_env=False, json={
            "model": "tiny", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user",
                          "content": "What is the capital of France? Answer with one word."}],
        })
        assert response.status_code == 200, response.text
        answer = response.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer
        print(f"\ncontainer start to /health: {to_health:.2f} s; answer: {answer!r}")
        # the health check and liveness probe the docs give: lalo itself, inside the container
        for path in ("/health", "/api/status"):
            probe = podman("exec", name, "/app/lalo/lalo", "--probe", path, check=False)
            assert probe.returncode == 0, probe.stderr
        ps = podman("exec", name, "/app/lalo/lalo", "status", "--json")
        assert json.loads(ps.stdout)["models"][0]["state"] == "ready"
        # SIGTERM drains: lalo stops its model server and exits 0 well within the timeout
        podman("stop", "--time", "30", name)
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, podman("logs", name, check=False).stderr
        assert "stopped" in podman("logs", name).stderr
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
    assert name not in podman("ps", "--all", "--format", "{{.Names}}").stdout


def test_the_k8s_pod_runs_this_image(built: Built, loaded: str, tmp_path: Path) -> None:
    """The pod the k8s base describes, played by podman with the same settings: the init
    container seeds the models volume, then lalo runs as 65532 on a read-only root with the
    ConfigMap's lalo.yaml, the volume read-only, emptyDirs for state and /tmp, the
    Deployment's args and env; its probes pass and it answers."""
    result = Packager(report=lambda _line: None).build(
        load_spec(str(built.out.parent / "smol.yaml")), tmp_path / "dist", ["k8s"])
    assert result.k8s is not None
    base = result.k8s.directory
    deployment = yaml.safe_load((base / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (lalo,) = pod["containers"]
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o777)  # the emptyDir/PVC is group-writable through fsGroup in a cluster
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    # emptyDirs are host folders, 0777 (podman's --tmpfs ignored mode= here: EACCES)
    empty = {}
    for mount in ("/tmp", "/var/lib/lalo"):
        empty[mount] = tmp_path / mount.strip("/").replace("/", "-")
        empty[mount].mkdir()
        empty[mount].chmod(0o1777)
    common = [*RUN_FLAGS, "--user", user, "--read-only", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "-v", f"{empty['/tmp']}:/tmp"]
    podman("run", "--rm", *common, "-v", f"{models}:/models", loaded, *init["args"])
    assert any(p.suffix == ".gguf" for p in models.iterdir())
    env = [f"--env={e['name']}={e['value']}" for e in lalo["env"] if "value" in e]
    name = f"lalo-pod-{uuid.uuid4().hex[:8]}"
    host_port = free_port()
    url = f"http://127.0.0.1:{host_port}"
    podman("run", "-d", "--name", name, *common, *env, "-v", f"{empty['/var/lib/lalo']}:/var/lib/lalo",
           "-v", f"{base}:/etc/lalo:ro", "-v", f"{models}:/models:ro",
           "-p", f"127.0.0.1:{host_port}:{PORT}", loaded, *lalo["args"])
    try:
        wait_answering(url + lalo["readinessProbe"]["httpGet"]["path"], name,
                       "the pod's readiness probe")
        liveness = podman("exec", name, *lalo["livenessProbe"]["exec"]["command"], check=False)
        assert liveness.returncode == 0, liveness.stderr
        response = httpx.post(url + "/v1/chat/completions", timeout=120.0, trust_env=False, json={
            "model": "smol", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user",
                          "content": "What is the capital of France? Answer with one word."}],
        })
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
        status = httpx.get(url + "/api/status", timeout=5.0, trust_env=False).json()
        assert status["ram"]["budget"] == result.k8s.size.ram_budget  # not the node's RAM
        stop = str(pod["terminationGracePeriodSeconds"])
        podman("stop", "--time", stop, name)
        assert json.loads(podman("inspect", name).stdout)[0]["State"]["ExitCode"] == 0
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_podman_kube_play_of_the_rendered_base(built: Built, loaded: str,
                                               tmp_path: Path) -> None:
    """The k8s base read by a real consumer of Kubernetes YAML: `kubectl kustomize` renders it
    and `podman kube play` runs it: the ConfigMap, the PVC seeded by the init container, lalo
    as 65532 on a read-only root, the pod's memory limit as a real cgroup. lalo inside plans
    against that limit, answers, and keeps its idle model loaded (the default 1 GiB reserve
    is more than such a pod has; yielding to it unloaded the model the moment it idled)."""
    result = Packager(report=lambda _line: None).build(
        load_spec(str(built.out.parent / "smol.yaml")), tmp_path / "dist", ["k8s"])
    assert result.k8s is not None
    rendered = subprocess.run(["kubectl", "kustomize", str(result.k8s.directory)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    documents = list(yaml.safe_load_all(rendered))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    # podman 4.3 restarts a pod's init containers under `restartPolicy: Always` (a Deployment's
    # only policy; containers/podman#16343), then fails to remove the one it restarted
    pod["restartPolicy"] = "OnFailure"
    play = tmp_path / "play.yaml"
    play.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    conf = tmp_path / "containers.conf"  # the two settings this VM needs (FACTS.md)
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
                    '[engine]\nruntime = "runc"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    volumes = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
               if "persistentVolumeClaim" in v]
    volumes += [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    networks_before = set(podman("network", "ls", "--format", "{{.Name}}").stdout.split())
    images_before = set(podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split())
    (lalo,) = pod["containers"]
    limit = parse_quantity(lalo["resources"]["limits"]["memory"])
    name = f"{deployment['metadata']['name']}-pod-0-{lalo['name']}"
    try:
        played = subprocess.run(["podman", "kube", "play", str(play)], env=env, text=True,
                                capture_output=True, timeout=300, check=False)
        assert played.returncode == 0, played.stderr
        infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}",
                       f"{deployment['metadata']['name']}-pod-0").stdout.strip()
        address = podman("inspect", "--format",
                         "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                         infra).stdout.strip()
        url = f"http://{address}:{PORT}"

        wait_answering(url + "/health", name, "the played pod to answer", interval=0.2)
        pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Uid:"))
        assert uids.split()[1:] == ["65532"] * 4, uids
        reply = httpx.post(url + "/v1/chat/completions", timeout=120.0, trust_env=False, json={
            "model": "smol", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user",
                          "content": "What is the capital of France? Answer with one word."}]})
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
        time.sleep(5)  # idle: five of lalo's RAM checks
        status = httpx.get(url + "/api/status", timeout=5.0, trust_env=False).json()
        ram = status["ram"]
        assert ram["cgroup_limit"] == limit and ram["total"] == limit, ram
        assert "memory limit of this container" in ram["budget_source"], ram
        assert ram["budget"] == result.k8s.size.ram_budget <= limit, ram
        (smol,) = status["models"]
        assert smol["state"] == "ready" and smol["loads"] == 1, smol  # not yielded to nothing
        assert "RAM short" not in podman("logs", name).stderr
        print(f"\npodman kube play: pod limit {limit >> 20} MiB, lalo's budget "
              f"{ram['budget'] >> 20} MiB ({ram['budget_source']})")
    finally:
        subprocess.run(["podman", "kube", "down", str(play)], env=env, capture_output=True,
                       timeout=120, check=False)
        podman("volume", "rm", "--force", *volumes, check=False)
        for network in set(podman("network", "ls", "--format", "{{.Name}}").stdout.split()) \
                - networks_before:
            podman("network", "rm", "--force", network, check=False)
        for image in set(podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()) \
                - images_before:
            if "podman-pause" in image:
                podman("rmi", "--force", image, check=False)


def parse_quantity(value: str) -> int:
    """A Kubernetes memory quantity in bytes (the suffixes the k8s target writes)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(value[: -len(suffix)]) * factor
    return int(value)


def test_seed_models_copies_the_bundled_models_once(built: Built, loaded: str,
                                                    tmp_path: Path) -> None:
    volume = tmp_path / "models"
    volume.mkdir()
    volume.chmod(0o777)  # the container's non-root user writes here
    argv = ["run", "--rm", *RUN_FLAGS, "-v", f"{volume}:/models", loaded, "--seed-models",
            "/models"]
    first = podman(*argv)
    assert "copied to /models" in first.stderr
    files = sorted(p.name for p in volume.iterdir() if not p.name.startswith("."))
    assert files == [m["file"].split("/")[-1] for m in json.loads(
        (built.result.bundle.directory / "manifest.json").read_text())["models"]]  # type: ignore[union-attr]
    second = podman(*argv)
    assert "already on /models" in second.stderr and "copied" not in second.stderr


def test_an_image_without_models_serves_them_from_a_volume(built: Built, tmp_path: Path,
                                                           network_state: None) -> None:
    """`image.models: volume`: the same bundle without models/ (much smaller), reading the
    models from a folder mounted at /models."""
    spec = built.out.parent / "smol.yaml"
    data = yaml.safe_load(spec.read_text())
    data["image"] = {"models": "volume", "tag": f"{data['image']['tag']}-volume"}
    volume_spec = built.out.parent / "smol-volume.yaml"
    volume_spec.write_text(yaml.safe_dump(data, sort_keys=False))
    result, _ = build(volume_spec, tmp_path / "dist")
    image, embedded = result.image, built.result.image
    assert image is not None and embedded is not None and image.models_mode == "volume"
    model_bytes = sum(m["size"] for m in json.loads(
        (built.result.bundle.directory / "manifest.json").read_text())["models"])  # type: ignore[union-attr]
    assert image.archive_size < embedded.archive_size - model_bytes * 0.9
    members = {m.name.lstrip("./") for m in Layout(image.archive).layer().getmembers()}
    assert not any(name.startswith("app/models/") for name in members)
    assert "models" in members  # the mount point exists
    models = tmp_path / "models"
    models.mkdir()
    for path in (built.result.bundle.directory / "models").iterdir():  # type: ignore[union-attr]
        shutil.copyfile(path, models / path.name)
    podman("load", "-i", str(image.archive))
    name = f"lalo-test-{uuid.uuid4().hex[:8]}"
    host_port = free_port()
    url = f"http://127.0.0.1:{host_port}"
    try:
        podman("run", "-d", "--name", name, *RUN_FLAGS, "-v", f"{models}:/models:ro",
               "-p", f"127.0.0.1:{host_port}:{PORT}", image.reference)

        def ready() -> bool:
            try:
                status = httpx.get(url + "/api/status", timeout=2.0, trust_env=False).json()
            except httpx.HTTPError:
                state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
                assert state == "running", podman("logs", name, check=False).stderr
                return False
            (model,) = status["models"]
            assert model["state"] != "failed", model
            return bool(model["state"] == "ready")

        wait_until(ready, START_TIMEOUT, interval=0.2, message="the model from the volume")
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
        podman("rmi", "--force", image.reference, check=False)
