"""GPU facts through NVML, with NVML's answers and errors monkeypatched.

NVML is the one thing that cannot be made to happen on this machine (no NVIDIA driver, no
GPU): the pynvml functions are replaced by ones answering as a driver does. The "no driver"
case is also checked for real: this machine has no libnvidia-ml.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from launcher.doctor.report import GPU_TIERS, gpu_tier
from launcher.machine.gpu import describe, gpu_facts

GIB = 1024**3


def fake_nvml(monkeypatch: pytest.MonkeyPatch, devices: list[dict[str, Any]],
              init_error: Exception | None = None) -> list[str]:
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    def handle(index: int) -> dict[str, Any]:
        device = devices[index]
        if "error" in device:
            raise device["error"]
        return device

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "580.65.06")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(devices))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", handle)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: h["name"])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo",
                        lambda h: SimpleNamespace(total=h["total"], free=h["free"], used=0))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCudaComputeCapability", lambda h: h["cc"])
    return calls


def test_this_machine_has_no_driver_and_says_none() -> None:
    report = gpu_facts()
    assert report.gpus == () and report.driver is None
    assert describe(report).startswith("none (no NVIDIA driver")


def test_two_gpus_are_read_with_name_vram_driver_and_compute_capability(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_nvml(monkeypatch, [
        {"name": "NVIDIA GeForce RTX 4090", "total": 24 * GIB, "free": 23 * GIB, "cc": (8, 9)},
        {"name": b"NVIDIA A100-SXM4-80GB", "total": 80 * GIB, "free": 79 * GIB, "cc": (8, 0)},
    ])
    report = gpu_facts()
    assert [(g.name, g.vram_total, g.vram_free, g.compute_capability) for g in report.gpus] == [
        ("NVIDIA GeForce RTX 4090", 24 * GIB, 23 * GIB, "8.9"),
        ("NVIDIA A100-SXM4-80GB", 80 * GIB, 79 * GIB, "8.0"),
    ]
    assert report.driver == "580.65.06" and report.error is None
    assert calls == ["init", "shutdown"]
    assert "RTX 4090, 24.0 GiB VRAM (23.0 GiB free), compute 8.9" in describe(report)


def test_a_failing_driver_is_none_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, [], init_error=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    report = gpu_facts()
    assert report.gpus == ()
    assert describe(report) == "none (NVIDIA driver present but NVML failed: Driver Not Loaded)"


def test_a_lost_gpu_is_left_out_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, [
        {"error": pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)},
        {"name": "NVIDIA H200", "total": 141 * GIB, "free": 140 * GIB, "cc": (9, 0)},
    ])
    report = gpu_facts()
    assert [g.index for g in report.gpus] == [1]
    assert report.error == "GPU 0: GPU is lost"


def test_gpu_tiers_follow_the_plan() -> None:
    assert gpu_tier([]) is None
    assert gpu_tier([8 * GIB]) is None
    assert gpu_tier([int(15.6 * GIB)]) is GPU_TIERS[0]  # a "16 GB" card reports a little less
    assert gpu_tier([int(23.6 * GIB)]) is GPU_TIERS[1]
    assert gpu_tier([80 * GIB]) is GPU_TIERS[1]  # one A100 is not the 2x A100 tier
    assert gpu_tier([80 * GIB, 80 * GIB]) is GPU_TIERS[2]
    assert gpu_tier([80 * GIB] * 4) is GPU_TIERS[3]
