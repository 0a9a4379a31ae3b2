"""Multi-process training under torchrun / accelerate launch, without DDP's module wrapper.

Local backward runs one backward per block, and DistributedDataParallel expects exactly one per
forward, so lopt keeps the model unwrapped and sums gradients across processes itself after the
accumulation window (see training/step.py), or shards it with FSDP2 (see fsdp.py, which also reads what
accelerate's config asks for). This module holds the process-group plumbing: joining the group the launcher
describes (`init_from_environment`), the few collectives lopt makes itself, and leaving it (`shutdown`).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from lopt.errors import LoptError

# What `accelerate launch` sets when its config asks for sharded training.
_SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def init_from_environment(sharded_by: str | None = None) -> torch.device:
    """Join the process group the launcher describes (WORLD_SIZE > 1) and return this process's device.

    A sharding launch is refused unless the caller shards the model itself (`sharded_by` "FSDP" or
    "DeepSpeed": `lopt sft`, after fsdp.py or deepspeed.py has accepted the accelerate settings).
    """
    for variable, name in _SHARDING_ENV.items():
        if os.environ.get(variable, "").lower() in ("1", "true") and name != sharded_by:
            # Running replicated under a sharding config would silently use far more memory than asked.
            raise LoptError(
                f"The accelerate config asks for {name}, which this command does not implement: every process "
                "would hold the whole model. Launch with a data-parallel config instead "
                "(configs/accelerate_multi_gpu.yaml) or torchrun; `lopt sft` also shards, under "
                "configs/accelerate_fsdp2.yaml, configs/accelerate_deepspeed_zero2.yaml or "
                "configs/accelerate_deepspeed_zero3.yaml."
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    elif sharded_by and not dist.is_initialized():
        # FSDP's device mesh and DeepSpeed's engine need a process group even for one process; a
        # private file store needs no launcher-provided address.
        store = Path(tempfile.mkdtemp(prefix="lopt-pg-")) / "store"
        dist.init_process_group(backend=backend, init_method=f"file://{store}", rank=0, world_size=1)
    return device


def shutdown() -> None:
    """Leave the process group, and let its communication threads end while Python is still fully alive.

    Call it at the end of a process's distributed work, once the model and the backend are released
    (`ParallelBackend.close`); a later `init_from_environment` joins a new group.

    Why not leave it to the interpreter's exit: gloo runs every collective on a worker thread of its process group,
    and that thread drops its references to the collective's tensors after the caller's wait() has returned;
    dropping the last C++ reference to a tensor that has a Python object takes the GIL. A process group and its
    threads live until the last reference to it is gone, not until `destroy_process_group()`, and more than torch
    holds them: DeepSpeed (module globals, default arguments, the ZeRO-3 model's parameters) and FSDP2's device meshes
    (kept by DTensor's caches). Still alive when Python finalizes, a thread that asks for the GIL then is ended by
    Python inside a noexcept destructor: the process aborts (SIGABRT, "terminate called without an active
    exception") after its work is done. Here the groups are destroyed while Python runs normally: the meshes and
    DeepSpeed let go of theirs, and collecting the reference cycles that still hold one (DeepSpeed's engine and
    hooks) drops the last reference, which joins the group's threads once they have released their work.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    fsdp = sys.modules.get("lopt.parallel.fsdp")  # imported: it may have made device meshes
    if fsdp is not None:
        fsdp.release_process_groups()
    if "deepspeed.comm" in sys.modules:  # imported by lopt, or by transformers or accelerate wherever it is installed
        destroy_deepspeed_process_groups()
    else:
        dist.destroy_process_group()
    gc.collect()


def destroy_deepspeed_process_groups() -> None:
    """Destroy torch's process groups, and what DeepSpeed keeps of them (`shutdown` calls it once DeepSpeed is
    imported, by lopt or by transformers or accelerate wherever it is installed, whichever backend the run used).

    Besides the groups deepspeed.utils.groups keeps in module globals (released by deepspeed.comm's destroy),
    TorchBackend.barrier and monitored_barrier (deepspeed.comm.torch, 0.19.8) take torch's world group as it is when
    DeepSpeed is imported as their default `group`: imported after the group was made, they would keep it, and its
    threads, alive until the process exits. None, their default when imported before, means the world group to both.
    """
    from deepspeed import comm

    backend = importlib.import_module("deepspeed.comm.torch")  # the attribute `torch` of deepspeed.comm is torch
    for name in ("barrier", "monitored_barrier"):
        function = getattr(getattr(backend, "TorchBackend", None), name, None)
        defaults = getattr(function, "__defaults__", None)
        if defaults and any(isinstance(value, torch.distributed.ProcessGroup) for value in defaults):
            function.__defaults__ = tuple(
                None if isinstance(value, torch.distributed.ProcessGroup) else value for value in defaults
            )
    if comm.is_initialized():  # torch's groups, then DeepSpeed's references to them
        comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_from_main(value):
    """The main process's `value` (any picklable object), on every process."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when the flag is set on at least one (a signal reaches one process first)."""
    return all_reduce_sum(float(flag), device) > 0


def all_reduce_gradients(parameters: list[torch.nn.Parameter], mean: bool = False) -> None:
    """Sum gradients over processes, or with `mean` average them.

    The SFT loop sums: its losses are already scaled by the global normalizers. TRL's losses are
    per-process means that DistributedDataParallel would average, so LoPT inside TRL takes the mean.
    """
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if mean:
        flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
