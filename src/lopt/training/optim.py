"""Optimizer, schedule and clipping: AdamW (32-bit, or 8-bit state with bitsandbytes) over LoPT's two learning-rate
groups, and the gradient clip by the global norm or block by block."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lopt.config.optimizers import OPTIMIZERS
from lopt.errors import LoptError, unknown_choice

if TYPE_CHECKING:  # annotations only: each function imports torch where it runs
    import torch

    from lopt.models.local_learning import LocalLearningLM


def optimizer_class(name: str, device_type: str) -> type[torch.optim.Optimizer]:
    """The optimizer `--optim name` builds on `device_type` ("cpu", "cuda"); a LoptError naming what can run instead."""
    import torch

    if name not in OPTIMIZERS:  # parse_config refuses it (the flag's choices); this is for direct callers
        raise unknown_choice("--optim", name, OPTIMIZERS)
    if name == "adamw_torch":
        return torch.optim.AdamW
    if name == "paged_adamw_8bit" and device_type != "cuda":
        raise LoptError(
            "--optim paged_adamw_8bit pages the optimizer state between GPU and CPU memory, which needs CUDA, and "
            f"this run is on {device_type}: use --optim adamw_8bit (the same 8-bit state, not paged) or adamw_torch."
        )
    try:
        import bitsandbytes
    except ImportError as error:
        raise LoptError(
            f"--optim {name} keeps AdamW's state in 8 bits with bitsandbytes, which does not import here ({error}): "
            "`pip install 'bitsandbytes>=0.50'` (0.50 is the first tested on CPU), or use --optim adamw_torch."
        ) from error
    return bitsandbytes.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bitsandbytes.optim.AdamW8bit


def _no_decay(param: torch.nn.Parameter) -> bool:
    # Biases and norm gains are 1-D; decaying them toward zero only hurts (the usual HF/TRL rule).
    return param.ndim < 2


def build_optimizer(
    model: LocalLearningLM,
    learning_rate: float,
    lr_k1: float | None = None,
    weight_decay: float = 0.0,
    optim: str = "adamw_torch",
) -> torch.optim.Optimizer:
    """Early blocks, embeddings and reconstruction heads train at `lr_k1` (default: the wrapper's LoPT settings'
    lr_k1, else `learning_rate`); the final block, final norm and LM head at `learning_rate`. Each group is split by
    weight decay."""
    if lr_k1 is None and model.settings is not None:
        lr_k1 = model.settings.lr_k1
    rates = {"early": learning_rate if lr_k1 is None else lr_k1, "final": learning_rate}
    groups = []
    for name, params in model.parameter_groups().items():
        for decay in (True, False):
            chosen = [p for p in params if _no_decay(p) != decay]
            if chosen:
                groups.append(
                    {
                        "name": f"{name}{'' if decay else '_no_decay'}",
                        "params": chosen,
                        "lr": rates[name],
                        "weight_decay": weight_decay if decay else 0.0,
                    }
                )
    device = next(model.parameters()).device
    return optimizer_class(optim, device.type)(groups, lr=learning_rate)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors, each storage counted once (bitsandbytes shares its quantization maps
    between parameters)."""
    import torch

    storages = {}
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_ratio: float, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        kind, optimizer, num_warmup_steps=int(round(warmup_ratio * total_steps)), num_training_steps=total_steps
    )


def clip_gradients(blocks: list[list[torch.nn.Parameter]], max_norm: float, per_block: bool) -> list[float]:
    """Clip the gradients of `blocks` (`LocalLearningLM.block_parameters()`, or one block's list) to `max_norm`
    (inf: leave them) and return each block's gradient L2 norm before clipping.

    `per_block` (--clip_per_block, --block_step) clips each block by its own norm, so a block whose local loss
    gives large gradients cannot shrink another's; otherwise all are scaled by one factor from the global norm, the
    norm of the blocks' norms: one `torch.nn.utils.clip_grad_norm_` over every parameter, up to rounding.
    """
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    grads = [[p.grad for p in block if p.grad is not None] for block in blocks]
    norms = [get_total_norm(block_grads) for block_grads in grads]
    if per_block:
        for block, norm in zip(blocks, norms, strict=True):
            clip_grads_with_norm_(block, max_norm, norm)
    else:
        # a block without gradients (frozen) is left out: its norm, a CPU zero, would not stack with the others
        total = get_total_norm([norm for norm, block_grads in zip(norms, grads, strict=True) if block_grads])
        clip_grads_with_norm_([p for block in blocks for p in block], max_norm, total)
    return [float(norm) for norm in norms]
