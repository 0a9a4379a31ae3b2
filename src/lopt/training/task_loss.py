"""The final block's objective, as a plug-in the recipe passes to the training step.

The step (step.py) runs the model up to the final hidden states, block by block with the local
losses, then asks the task loss for a *sum* over the units it counts (trained tokens for causal LM,
pairs for a reward model, ...) and divides by the number of those units in the whole accumulation
window, on all processes. So a window split into micro-batches or across processes gives the
gradient of one global mean, whatever the objective.

A KL term to a reference model, a distillation loss or a pairwise reward-model loss is a class with
these two methods, passed as `task_loss=` to `forward_backward` / `run_sft`; the loop is unchanged.
The local reconstruction objective of the earlier blocks is not a plug-in: it is LoPT itself and
lives with the block wrapper (models/local_learning.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lopt.data.collate import IGNORE_INDEX
from lopt.models.local_learning import LocalLearningLM
from lopt.training.loss import causal_lm_loss_sum


class TaskLoss(Protocol):
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units (tokens, pairs, ...) of `batch` the loss sums over; the window's total normalizes it."""

    def __call__(self, model: LocalLearningLM, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of `batch` from `hidden`, the final normed hidden states [batch, seq, hidden]."""


@dataclass(frozen=True)
class CausalLMLoss:
    """Next-token cross entropy over labelled positions, through the LM head without full logits (loss.py).

    `liger` uses Liger Kernel's fused linear cross entropy instead of the chunked one (CUDA).
    """

    liger: bool = False

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model: LocalLearningLM, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum, _ = causal_lm_loss_sum(hidden, model.parts.lm_head, batch["labels"], liger=self.liger)
        return loss_sum
