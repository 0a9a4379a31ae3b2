"""The replicated backend: one process, or data parallel with every process holding the whole model.

The model is never wrapped in DistributedDataParallel: DDP expects one backward per forward, and
local backward runs one per block. The gradients are summed across processes after the window
instead (the losses are already normalized by global counts, see training/step.py), which gives the
result of one process on the global batch. `--fp16` lives here: autocast plus a loss scaler (the
sharded backends refuse it).

Checkpoints hold the full optimizer state keyed by parameter name (torch's distributed state-dict
API), so a run can resume on any number of processes, sharded by FSDP2 or not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from lopt.models.local_learning import LocalLearningLM
from lopt.parallel.backend import FiniteCheck, FullState, ParallelBackend, StepSettings
from lopt.parallel.deepspeed import check_resumable
from lopt.parallel.distributed import all_reduce_gradients
from lopt.training.optim import clip_gradients


class ReplicatedBackend(ParallelBackend):
    name = "replicated"

    def __init__(self, device: torch.device, settings: StepSettings):
        super().__init__(device)
        self.step_settings = settings  # `step` reads LoPT's clip_per_block there; `step_block` needs only these two
        self.max_grad_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
        self.fp16 = settings.fp16
        self.scaler: torch.amp.GradScaler | None = None

    def prepare_optimizer(self, model: LocalLearningLM, optimizer: torch.optim.Optimizer) -> None:
        # Made here, after loading the model has refused --fp16 without CUDA.
        self.scaler = torch.amp.GradScaler("cuda") if self.fp16 else None

    def autocast(self) -> AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if self.scaler else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def reduce_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        all_reduce_gradients(parameters)

    def step(
        self, model: LocalLearningLM, optimizer: torch.optim.Optimizer, check: FiniteCheck
    ) -> tuple[float, list[float]]:
        blocks = model.block_parameters()
        self.reduce_gradients([p for block in blocks for p in block])
        if self.scaler:
            self.scaler.unscale_(optimizer)
        lopt = self.step_settings.lopt
        block_norms = clip_gradients(blocks, self.max_grad_norm, lopt is not None and lopt.clip_per_block)
        grad_norm = math.hypot(*block_norms)
        check(0.0 if self.scaler else grad_norm, step_taken=False)  # with fp16 the scaler skips inf steps itself
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, block_norms

    def step_block(
        self, parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, check: Callable[[float], None]
    ) -> float:
        """--block_step: reduce, clip by the block's own norm, check, and step `parameters` (one block's), then free
        their gradients. AdamW skips parameters without gradients, so only this block moves."""
        self.reduce_gradients(parameters)
        (grad_norm,) = clip_gradients([parameters], self.max_grad_norm, per_block=True)
        check(grad_norm)
        optimizer.step()
        for p in parameters:
            p.grad = None
        return grad_norm

    def full_state(self, model: LocalLearningLM, optimizer: torch.optim.Optimizer | None = None) -> FullState:
        options = StateDictOptions(full_state_dict=True)
        optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
        return FullState(model, model.aux_heads.state_dict(), optim)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else None, "deepspeed": None}

    def load_state(
        self, checkpoint: Path, state: dict, model: LocalLearningLM, optimizer: torch.optim.Optimizer
    ) -> None:
        check_resumable(checkpoint, state.get("deepspeed"), None)
        load_optimizer_state(model, optimizer, state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def load_optimizer_state(model: LocalLearningLM, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore `full_state(...).optimizer` on any number of processes, sharded or not."""
    if any(isinstance(p, int) for group in state["param_groups"] for p in group["params"]):
        optimizer.load_state_dict(state)  # keyed by position: a checkpoint from lopt before FSDP support
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
