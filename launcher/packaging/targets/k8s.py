"""`lalo build --target k8s`: `DIR/NAME-k8s/`, a kustomize base for the spec's image.

Deployment (non-root, read-only root file system, probes on lalo's own routes, resources from
launcher.packaging.targets.k8s_sizing), Service, the lalo.yaml as a generated ConfigMap (a changed
config rolls the pods), a PersistentVolumeClaim for the models and a NetworkPolicy that lets
in only the proxy port. The image's models are copied onto the volume by an init container.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.packaging import layout
from launcher.packaging.frozen.entry import PROBE_FLAG, SEED_FLAG
from launcher.packaging.inputs import ModelInput
from launcher.packaging.spec import BundleSpec
from launcher.packaging.targets.image_layout import (
    APP_DIR,
    CONFIG_MOUNT,
    ENTRYPOINT,
    GID,
    STATE_ROOT,
    UID,
    serve_arguments,
)
from launcher.packaging.targets.k8s_sizing import (
    PodSize,
    gibibytes,
    mebibytes,
    millicpus,
    size_pod,
)

SUFFIX = "-k8s"
# lalo's stop on SIGTERM: the model servers (each up to stop_timeout, all at once), then the
# proxy's open requests (runner waits 10 s for it); a few seconds more for the process exit.
PROXY_DRAIN_TIMEOUT = 10
EXIT_MARGIN = 5
GPU_RESOURCE = "nvidia.com/gpu"
# Both containers' (one object: the YAML of an embed pod names it once and refers to it again)
_SECURITY: dict[str, Any] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                             "capabilities": {"drop": ["ALL"]}}
Report = Callable[[str], None]


@dataclass(frozen=True)
class K8sResult:
    directory: Path
    size: PodSize
    image: str
    warnings: tuple[str, ...]


def k8s_name(spec: BundleSpec) -> str:
    return f"{spec.name}{SUFFIX}"


def grace_period(stop_timeout: float) -> int:
    """terminationGracePeriodSeconds: long enough for lalo's whole drain."""
    return math.ceil(stop_timeout) + PROXY_DRAIN_TIMEOUT + EXIT_MARGIN


def build_k8s(spec: BundleSpec, models: Sequence[ModelInput], out: Path,
              report: Report) -> K8sResult:
    spec.require_fixed_contexts("k8s", "the pod's memory request")
    facts = {m.name: ModelFacts.from_gguf(read_gguf(m.require_path())) for m in models}
    files = {m.name: m.require_path().stat().st_size for m in models}
    kube = spec.fields.kubernetes
    size = size_pod(spec.config, facts, files, cpus_per_auto_model=kube.cpus_per_auto_model,
                    storage=None if kube.storage == "auto" else kube.storage)
    image = spec.image_reference()
    warnings: list[str] = []
    if kube.gpus:
        warnings.append(
            f"k8s: the pod asks for {kube.gpus} {GPU_RESOURCE}; the image's llama-server must be "
            "a CUDA build to use it (this image runs models on the CPU, sized as above)"
        )
    if spec.config.proxy.api_keys:
        warnings.append("k8s: proxy.api_keys from the spec end up in a ConfigMap; put keys in "
                        f"the Secret {spec.name}-api-keys instead (LALO_API_KEYS)")
    final = out / k8s_name(spec)
    staging = out / f".{final.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        documents = manifests(spec, models, size, image)
        for name, document in documents.items():
            (staging / name).write_text(document, encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"k8s: {final} (memory request {mebibytes(size.memory_request)}, limit "
           f"{mebibytes(size.memory_limit)}, cpu {millicpus(size.millicpus)})")
    return K8sResult(directory=final, size=size, image=image, warnings=tuple(warnings))


def manifests(spec: BundleSpec, models: Sequence[ModelInput], size: PodSize,
              image: str) -> dict[str, str]:
    """File name -> YAML text of the kustomize base."""
    name = spec.name
    port = spec.config.proxy.port
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "lalo"}
    kube = spec.fields.kubernetes
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
    }
    if kube.namespace:
        kustomization["namespace"] = kube.namespace
    kustomization["resources"] = ["deployment.yaml", "service.yaml", "pvc.yaml",
                                  "networkpolicy.yaml"]
    kustomization["configMapGenerator"] = [{"name": f"{name}-config", "files": ["lalo.yaml"]}]
    return {
        "kustomization.yaml": _dump(kustomization),
        "deployment.yaml": _dump(deployment(spec, size, image, labels)),
        "service.yaml": _dump({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": labels},
            "spec": {"type": "ClusterIP", "selector": labels,
                     "ports": [{"name": "http", "port": port, "targetPort": "http",
                                "protocol": "TCP"}]},
        }),
        "pvc.yaml": _dump(_claim(spec, size, labels)),
        "networkpolicy.yaml": _dump({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "labels": labels},
            "spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"protocol": "TCP", "port": port}]}]},
        }),
        "lalo.yaml": pod_config(spec, models, size),
    }


def pod_config(spec: BundleSpec, models: Sequence[ModelInput], size: PodSize) -> str:
    """The lalo.yaml of the ConfigMap: models on the volume, the engine in the image, the RAM
    budget the pod's limit leaves (never `auto`: that would also take the default 1 GiB reserve
    out of the limit; lalo checks the budget against the limit it reads in the pod)."""
    files = layout.model_file_names(models)
    models_dir = spec.fields.image.models_dir
    header = (f"# lalo.yaml of the {spec.name} pod, generated by `lalo build --target k8s` from "
              f"{spec.source.name}.\n# Memory: request {mebibytes(size.memory_request)} = lalo's "
              f"estimate of the preload models + lalo; ram_budget = the limit less lalo.\n")
    return layout.bundled_config(
        spec, models, {n: f"{models_dir}/{f}" for n, f in files.items()},
        engine_path=layout.bundle_engine_path(), variant=spec.fields.engine.llama_server.variant,
        header=header, overrides={"resources": {"ram_budget": size.ram_budget}},
    )


def deployment(spec: BundleSpec, size: PodSize, image: str,
               labels: dict[str, str]) -> dict[str, Any]:
    """The Deployment: lalo's container, and on `models: embed` one that first seeds the
    models volume from the image; non-root, read-only root filesystem, no service token."""
    name = spec.name
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": GID,
                            "fsGroup": GID, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace_period(spec.config.supervisor.stop_timeout),
    }
    if spec.fields.image.models == "embed":
        pod["initContainers"] = [_seed_container(spec, image)]
    pod["containers"] = [_lalo_container(spec, size, image)]
    pod["volumes"] = [
        {"name": "config", "configMap": {"name": f"{name}-config"}},
        {"name": "models", "persistentVolumeClaim": {"claimName": f"{name}-models"}},
        {"name": "state", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"lalo.ai/app-dir": APP_DIR}},
        "spec": {
            "replicas": spec.fields.kubernetes.replicas,
            # the models volume is ReadWriteOnce: the old pod lets go before the new one starts
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {"lalo.ai/memory-estimate": size.annotation()}},
                "spec": pod,
            },
        },
    }


def _lalo_container(spec: BundleSpec, size: PodSize, image: str) -> dict[str, Any]:
    """`lalo serve` with the pod's memory and CPU, its config and keys, and its probes."""
    gpus = spec.fields.kubernetes.gpus
    resources: dict[str, Any] = {
        "requests": {"memory": mebibytes(size.memory_request), "cpu": millicpus(size.millicpus)},
        "limits": {"memory": mebibytes(size.memory_limit)},
    }
    if gpus:
        resources["requests"][GPU_RESOURCE] = gpus
        resources["limits"][GPU_RESOURCE] = gpus
    return {
        "name": "lalo",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": serve_arguments(),
        "env": [
            {"name": "LALO_CONFIG", "value": f"{CONFIG_MOUNT}/lalo.yaml"},
            {"name": "LALO_API_KEYS", "valueFrom": {"secretKeyRef": {
                "name": f"{spec.name}-api-keys", "key": "keys", "optional": True}}},
        ],
        "ports": [{"name": "http", "containerPort": spec.config.proxy.port, "protocol": "TCP"}],
        "resources": resources,
        "securityContext": _SECURITY,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "models", "mountPath": spec.fields.image.models_dir, "readOnly": True},
            {"name": "state", "mountPath": STATE_ROOT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        # /health answers as soon as the proxy runs (models may still load: they are started
        # on the first request that needs them, so traffic may come)
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"},
                         "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                           "periodSeconds": 5, "failureThreshold": 3},
        # /api/status needs a key when keys are set: the probe is lalo itself, which reads the
        # running instance's admin token from its state folder
        "livenessProbe": {"exec": {"command": [ENTRYPOINT, PROBE_FLAG, "/api/status"]},
                          "periodSeconds": 20, "timeoutSeconds": 10, "failureThreshold": 3},
    }


def _seed_container(spec: BundleSpec, image: str) -> dict[str, Any]:
    """The init container that copies the image's models onto the volume (once)."""
    models_dir = spec.fields.image.models_dir
    return {
        "name": "seed-models",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": [SEED_FLAG, models_dir],
        "resources": {"requests": {"memory": "64Mi", "cpu": "100m"},
                      "limits": {"memory": "256Mi"}},
        "securityContext": _SECURITY,
        "volumeMounts": [{"name": "models", "mountPath": models_dir},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def _claim(spec: BundleSpec, size: PodSize, labels: dict[str, str]) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": gibibytes(size.storage)}},
    }
    if spec.fields.kubernetes.storage_class:
        claim["storageClassName"] = spec.fields.kubernetes.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{spec.name}-models", "labels": labels}, "spec": claim}


def _dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
