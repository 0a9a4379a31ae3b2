"""Samples of what the hardware is doing: this process's CPU and memory (psutil), each GPU's memory and
utilization (NVML through `pynvml`, from the optional `nvidia-ml-py` package).

NVML sees every GPU of the machine, not only this process's, which is what a person watching a run
wants: another job on the same GPU is visible too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NO_GPU = "no GPU"
NO_PYNVML = "GPU memory and utilization need nvidia-ml-py (pynvml is not installed): pip install nvidia-ml-py"


@dataclass
class GpuSample:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    utilization_percent: int | None  # None where the GPU does not report it (some MIG slices)


@dataclass
class HardwareSample:
    cpu_percent: float | None  # this process, over the time since the previous sample (100 = one core)
    rss_bytes: int | None  # None: no process sampled (lopt watch runs in another process than the training)
    gpus: list[GpuSample] = field(default_factory=list)
    gpu_note: str | None = None  # why there is no GPU line: NO_GPU, NO_PYNVML or NVML's error


def cuda_visible() -> bool:
    """Whether this machine has a CUDA GPU, asked without importing torch (lopt watch need not load it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.is_available()
    gpus = Path("/proc/driver/nvidia/gpus")  # the NVIDIA driver's listing on Linux
    return gpus.is_dir() and any(gpus.iterdir())


class HardwareSampler:
    """Call `sample()` every second or so; `process=False` leaves out this process (lopt watch)."""

    def __init__(self, process: bool = True):
        self.process = psutil.Process() if process else None
        if self.process is not None:
            self.process.cpu_percent(None)  # the first call only starts psutil's interval
        self._nvml = None
        self._gpu_note: str | None = None
        try:
            import pynvml
        except ImportError:
            self._gpu_note = NO_PYNVML if cuda_visible() else NO_GPU
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:  # no NVIDIA driver: a machine without a GPU, or a broken driver
            self._gpu_note = f"NVML failed: {error}" if cuda_visible() else NO_GPU
            return
        self._nvml = pynvml
        if pynvml.nvmlDeviceGetCount() == 0:
            self._gpu_note = NO_GPU

    def sample(self) -> HardwareSample:
        cpu = rss = None
        if self.process is not None:
            cpu = self.process.cpu_percent(None)
            rss = self.process.memory_info().rss
        return HardwareSample(cpu_percent=cpu, rss_bytes=rss, gpus=self._gpus(), gpu_note=self._gpu_note)

    def _gpus(self) -> list[GpuSample]:
        if self._nvml is None or self._gpu_note is not None:
            return []
        nvml, gpus = self._nvml, []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                except nvml.NVMLError:  # not reported by some GPUs (MIG slices)
                    utilization = None
                name = nvml.nvmlDeviceGetName(handle)
                gpus.append(
                    GpuSample(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else name,  # bytes in older pynvml
                        used_bytes=int(memory.used),
                        total_bytes=int(memory.total),
                        utilization_percent=utilization,
                    )
                )
        except nvml.NVMLError as error:  # a GPU that fell off the bus: say so instead of stopping the dashboard
            self._gpu_note = f"NVML failed: {error}"
            return []
        return gpus

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
