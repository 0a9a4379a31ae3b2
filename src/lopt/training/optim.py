"""Optimizer and schedule: AdamW over LoPT's two learning-rate groups."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from lopt.models.local_learning import LocalLearningLM


def _no_decay(param: torch.nn.Parameter) -> bool:
    # Biases and norm gains are 1-D; decaying them toward zero only hurts (the usual HF/TRL rule).
    return param.ndim < 2


def build_optimizer(
    model: LocalLearningLM, learning_rate: float, lr_k1: float | None, weight_decay: float
) -> torch.optim.AdamW:
    """Early blocks, embeddings and reconstruction heads train at `lr_k1` (default: `learning_rate`);
    the final block, final norm and LM head at `learning_rate`. Each group is split by weight decay."""
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
    return torch.optim.AdamW(groups, lr=learning_rate)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_ratio: float, total_steps: int):
    return get_scheduler(
        kind, optimizer, num_warmup_steps=int(round(warmup_ratio * total_steps)), num_training_steps=total_steps
    )
