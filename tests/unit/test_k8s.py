"""`lalo build --target k8s`: the kustomize base built from generated models, rendered by
`kubectl kustomize` and every object validated against the Kubernetes API schema
(kubernetes-validate); memory requests equal lalo's own estimate for a crafted config.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.config import parse_config
from launcher.errors import ConfigError
from launcher.models.gguf_file import read_gguf
from launcher.models.shape import MIB, ModelFacts
from launcher.packaging.build import Packager
from launcher.packaging.spec import load_spec, parse_spec
from launcher.packaging.targets.k8s import grace_period
from launcher.packaging.targets.k8s_sizing import LALO_OWN_MEMORY, PROBE_MEMORY
from launcher.placement.estimate import estimate_memory, repack_types_for

kubernetes_validate = pytest.importorskip("kubernetes_validate")
KUBECTL = shutil.which("kubectl")
PORT = 8181


def write_spec(folder: Path, small_model: Path, small_model_b: Path, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "name": "tiny",
        "models": {
            # preloaded: in the memory request
            "alpha": {"file": str(small_model), "license": "MIT", "ctx_size": 1024,
                      "parallel": 2, "threads": 3},
            # on demand: only in the limit
            "beta": {"file": str(small_model_b), "license": "Apache-2.0", "ctx_size": 512,
                     "preload": False},
        },
        "proxy": {"port": PORT},
        "supervisor": {"stop_timeout": 20},
        "targets": ["k8s"],
    }
    data.update(extra)
    spec = folder / "tiny.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


def node_estimate(path: Path, ctx_size: int, parallel: int) -> int:
    """lalo's estimate, computed here from the GGUF itself (as `lalo plan` does), for an
    x86-64 node whose CPU repacks the most weight types."""
    facts = ModelFacts.from_gguf(read_gguf(path))
    repack = repack_types_for("x86_64", {"avx2", "avx512f"})
    return estimate_memory(facts, ctx_size, parallel, repack_types=repack).total


def build(spec: Path, out: Path) -> Path:
    result = Packager(report=lambda _line: None).build(load_spec(str(spec)), out, ["k8s"])
    assert result.k8s is not None
    return result.k8s.directory


def rendered(base: Path) -> dict[str, dict[str, Any]]:
    """`kubectl kustomize` output by kind; every object valid for the newest Kubernetes
    schema kubernetes-validate knows, strictly (no unknown fields)."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (kubectl kustomize renders the base)")
    done = subprocess.run([KUBECTL, "kustomize", str(base)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    version = kubernetes_validate.latest_version()
    for item in objects:
        kubernetes_validate.validate(item, version, strict=True)
    by_kind = {item["kind"]: item for item in objects}
    assert sorted(by_kind) == ["ConfigMap", "Deployment", "NetworkPolicy",
                               "PersistentVolumeClaim", "Service"]
    return by_kind


def mebibytes(size: int) -> str:
    return f"{math.ceil(size / MIB)}Mi"


def test_memory_request_is_lalos_estimate_and_the_base_validates(
    tmp_path: Path, small_model: Path, small_model_b: Path
) -> None:
    base = build(write_spec(tmp_path, small_model, small_model_b), tmp_path / "dist")
    assert base == tmp_path / "dist" / "tiny-k8s"
    objects = rendered(base)
    alpha = node_estimate(small_model, 1024, 2)
    beta = node_estimate(small_model_b, 512, 1)
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (lalo,) = pod["containers"]
    resources = lalo["resources"]
    assert resources["requests"]["memory"] == mebibytes(alpha + LALO_OWN_MEMORY)
    assert resources["limits"]["memory"] == mebibytes(alpha + beta + LALO_OWN_MEMORY
                                                      + PROBE_MEMORY)
    assert resources["requests"]["cpu"] == "3100m"  # alpha's 3 threads + lalo's 0.1
    assert "nvidia.com/gpu" not in resources["limits"]
    annotation = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotation["lalo.ai/memory-estimate"] == f"alpha={alpha},lalo={LALO_OWN_MEMORY}"

    # probes on lalo's routes; the drain fits in the grace period
    assert lalo["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert lalo["livenessProbe"]["exec"]["command"] == ["/app/lalo/lalo", "--probe",
                                                         "/api/status"]
    assert pod["terminationGracePeriodSeconds"] == grace_period(20) == 35
    assert lalo["ports"] == [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
    assert lalo["image"] == "localhost/tiny:0.1.0"
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsNonRoot"]
    assert lalo["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["initContainers"][0]["args"] == ["--seed-models", "/models"]

    # only the proxy port comes in
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": PORT}]}]
    assert objects["Service"]["spec"]["ports"][0]["port"] == PORT
    size = small_model.stat().st_size + small_model_b.stat().st_size
    assert objects["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert size < 1024**3

    # the ConfigMap's lalo.yaml: loads, reads the volume, keeps lalo inside the limit
    configmap = objects["ConfigMap"]
    assert configmap["metadata"]["name"].startswith("tiny-config-")  # kustomize's hash suffix
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    config = parse_config(configmap["data"]["lalo.yaml"], label="configmap", total_ram=1 << 40)
    assert config.resources.ram_budget == alpha + beta
    assert config.supervisor.stop_timeout == 20
    assert config.models["alpha"].file == f"/models/{small_model.name}"
    assert config.models["beta"].preload is False


def test_gpus_namespace_storage_and_a_volume_image(
    tmp_path: Path, small_model: Path, small_model_b: Path
) -> None:
    spec = write_spec(tmp_path, small_model, small_model_b,
                      kubernetes={"gpus": 1, "namespace": "ai", "storage": "20GiB",
                                  "storage_class": "fast.ssd", "replicas": 2},
                      image={"models": "volume", "models_dir": "/srv/models",
                             "repository": "registry.example:5000/team/tiny", "tag": "v1"},
                      resources={"ram_budget": "3GiB"})
    objects = rendered(build(spec, tmp_path / "dist"))
    deployment = objects["Deployment"]
    assert deployment["metadata"]["namespace"] == "ai"
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (lalo,) = pod["containers"]
    assert lalo["image"] == "registry.example:5000/team/tiny:v1"
    assert lalo["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert lalo["resources"]["requests"]["nvidia.com/gpu"] == 1
    # an explicit ram_budget is the models' share of the limit
    assert lalo["resources"]["limits"]["memory"] == mebibytes(
        3 * 1024**3 + LALO_OWN_MEMORY + PROBE_MEMORY)
    assert "initContainers" not in pod  # nothing to seed: the image holds no models
    claim = objects["PersistentVolumeClaim"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "20Gi"
    assert claim["storageClassName"] == "fast.ssd"
    mounts = {m["name"]: m["mountPath"] for m in lalo["volumeMounts"]}
    assert mounts["models"] == "/srv/models"


@pytest.mark.parametrize(("section", "value", "message"), [
    ("kubernetes", {"gpus": -1}, "kubernetes.gpus"),
    ("kubernetes", {"namespace": "Not_A_Label"}, "kubernetes.namespace"),
    ("kubernetes", {"storage": "lots"}, "kubernetes.storage"),
    ("kubernetes", {"nodes": 3}, "kubernetes.nodes"),
    ("image", {"models": "inside"}, "image.models"),
    ("image", {"models_dir": "relative/dir"}, "image.models_dir"),
    ("image", {"models_dir": "/app"}, "image.models_dir"),
    ("image", {"tag": "has space"}, "image.tag"),
    ("image", {"repository": "Upper/Case"}, "image.repository"),
])
def test_bad_image_and_kubernetes_keys_name_their_path(
    tmp_path: Path, section: str, value: dict[str, Any], message: str
) -> None:
    text = yaml.safe_dump({"name": "tiny", "models": {"a": {"file": "a.gguf", "license": "MIT"}},
                           section: value})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_spec(text, source=tmp_path / "tiny.yaml")
