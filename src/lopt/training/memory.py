"""Memory measurements: saved-for-backward bytes (deterministic) and the process/device peak.

Peak *activation* memory is measured as the peak of live bytes that autograd keeps for backward,
counted through `torch.autograd.graph.saved_tensors_hooks`. It depends only on the model, the batch
and the backward mode, so it is the same on every machine. Parameters are excluded (they live for
the whole run); each storage counts once however many views of it are saved.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


class _Saved:
    """A saved tensor under watch: releasing it (when autograd frees the graph) releases its bytes."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: SavedTensorMeter, key: int, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Tracks live and peak bytes saved for backward while `active()` is entered."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self._excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [reference count, bytes]
        self.live_bytes = 0
        self.peak_bytes = 0
        self.gradient_bytes = 0  # gradients alive now, kept by a GradientMeter (0 without one)
        self.peak_with_gradients_bytes = 0  # the peak of saved activations and gradients alive together

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _pack(self, tensor: torch.Tensor):
        if tensor.device.type == "meta" or tensor.layout != torch.strided:
            return tensor
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._excluded:
            return tensor
        entry = self._refs.get(key)
        if entry is None:
            self._refs[key] = [1, storage.nbytes()]
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.peak_with_gradients_bytes = max(self.peak_with_gradients_bytes, self.live_bytes + self.gradient_bytes)
        else:
            entry[0] += 1
        return _Saved(self, key, tensor)

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._refs[key]

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    @contextlib.contextmanager
    def active(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class GradientMeter:
    """Live and peak bytes of `parameters`' gradients while `active()` is entered: a post-accumulate hook counts a
    gradient when it first appears and `freed` when the caller drops it (an optimizer step's zero_grad, a block's
    step). With `saved`, the saved-tensor meter also tracks the peak of activations and gradients alive together.
    Like the activation peak, the figures depend only on the model, the batch and the step, not on the machine."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], saved: SavedTensorMeter | None = None):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.saved = saved
        self._alive: dict[int, int] = {}  # id(parameter) -> bytes of its gradient
        self.live_bytes = 0
        self.peak_bytes = 0

    def _accumulated(self, parameter: torch.nn.Parameter) -> None:
        if id(parameter) not in self._alive:
            self._alive[id(parameter)] = parameter.grad.numel() * parameter.grad.element_size()
            self._moved(self._alive[id(parameter)])

    def freed(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for parameter in parameters:
            self._moved(-self._alive.pop(id(parameter), 0))

    def _moved(self, change: int) -> None:
        self.live_bytes += change
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.saved is not None:
            self.saved.gradient_bytes = self.live_bytes
            self.saved.peak_with_gradients_bytes = max(
                self.saved.peak_with_gradients_bytes, self.saved.live_bytes + self.live_bytes
            )

    @contextlib.contextmanager
    def active(self) -> Iterator[GradientMeter]:
        handles = [p.register_post_accumulate_grad_hook(self._accumulated) for p in self.parameters]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


_PROC_STATUS, _PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_device_peak(device: torch.device) -> None:
    """Start a new peak, so that a run's peak memory is its own and not an earlier run's in the same process (the
    demo trains several): CUDA's peak statistics; on Linux the resident-set high-water mark (writing 5 to
    /proc/self/clear_refs). Elsewhere the CPU peak stays the process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_CLEAR_REFS.exists():
        with contextlib.suppress(OSError):  # a kernel or sandbox that refuses it: the peak stays the process's
            _PROC_CLEAR_REFS.write_text("5")


def device_peak_bytes(device: torch.device) -> int:
    """Peak memory since the last `reset_device_peak` (or the process's start): allocated CUDA memory on GPU, the
    peak resident set on CPU (Linux: VmHWM, which the reset clears; elsewhere getrusage's, which nothing clears)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if _PROC_STATUS.exists():
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
