"""The NVIDIA GPUs of this machine, through NVML (`nvidia-ml-py`, the driver's own library).

`gpu_facts()` never raises: no driver (libnvidia-ml not found), a driver that fails to start,
or a GPU that does not answer all mean "what could be read", with the reason in `error`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from launcher.units import format_size


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    vram_total: int
    vram_free: int
    compute_capability: str  # "8.9" (Ada), "8.0"/"8.6" (Ampere), "9.0" (Hopper)

    def line(self) -> str:
        return (f"GPU {self.index}: {self.name}, {format_size(self.vram_total)} VRAM "
                f"({format_size(self.vram_free)} free), compute {self.compute_capability}")


@dataclass(frozen=True)
class GpuReport:
    gpus: tuple[GpuFacts, ...]
    driver: str | None  # the driver version; None without a driver
    error: str | None  # why there are none (no driver, NVML failed), None when read

    def to_json(self) -> dict[str, object]:
        return {"gpus": [asdict(gpu) for gpu in self.gpus], "driver": self.driver,
                "error": self.error}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_facts() -> GpuReport:
    """Every GPU NVML sees, or none with the reason."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return GpuReport((), None, "no NVIDIA driver: libnvidia-ml not found")
    except pynvml.NVMLError as exc:
        return GpuReport((), None, f"NVIDIA driver present but NVML failed: {exc}")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        found: list[GpuFacts] = []
        errors: list[str] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                found.append(GpuFacts(index, _text(pynvml.nvmlDeviceGetName(handle)),
                                      int(memory.total), int(memory.free), f"{major}.{minor}"))
            except pynvml.NVMLError as exc:  # one GPU lost or in a bad state: report the rest
                errors.append(f"GPU {index}: {exc}")
        return GpuReport(tuple(found), driver, "; ".join(errors) or None)
    except pynvml.NVMLError as exc:
        return GpuReport((), None, f"NVML failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def describe(report: GpuReport) -> str:
    """One line for `doctor`: the GPUs, or "none" and why."""
    if not report.gpus:
        return f"none ({report.error})" if report.error else "none"
    text = "; ".join(gpu.line() for gpu in report.gpus) + f"; driver {report.driver}"
    return text + (f" ({report.error})" if report.error else "")
