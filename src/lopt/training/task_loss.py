"""The final block's objective, as a plug-in the recipe passes to the training step.

The step (step.py) runs the model up to the final hidden states, block by block with the local
losses, then asks the task loss for a *sum* over the units it counts (trained tokens for causal LM,
pairs for a reward model, ...) and divides by the number of those units in the whole accumulation
window, on all processes. So a window split into micro-batches or across processes gives the
gradient of one global mean, whatever the objective.

A KL term to a reference model (`KLRegularizedLoss`, below), a distillation loss or a pairwise
reward-model loss is a class with these two methods, passed as `task_loss=` to `forward_backward` /
`run_sft`; the loop is unchanged. A loss that logs more than its objective returns `LossTerms`.
The local reconstruction objective of the earlier blocks is not a plug-in: it is LoPT itself and
lives with the block wrapper (models/local_learning.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lopt.data.collate import IGNORE_INDEX
from lopt.models.adapters import model_parts
from lopt.models.local_learning import LocalLearningLM, backbone_hidden_states
from lopt.training.loss import causal_lm_loss_sum, chunked_kl_sum


@dataclass
class LossTerms:
    """A task loss's result when it logs parts of its objective: `objective` is the summed loss backward
    sees; `logged` holds summed parts by metrics name (`task_loss`, `kl`, ...), each reported as its
    mean over the window's units. Without a `task_loss` part the objective is reported as the task loss."""

    objective: torch.Tensor
    logged: dict[str, torch.Tensor]


class TaskLoss(Protocol):
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units (tokens, pairs, ...) of `batch` the loss sums over; the window's total normalizes it."""

    def __call__(
        self, model: LocalLearningLM, hidden: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor | LossTerms:
        """The summed loss of `batch` from `hidden`, the final normed hidden states [batch, seq, hidden]."""


def trained_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, seq - 1] mask of the positions whose next token is trained (has a label)."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


@dataclass(frozen=True)
class CausalLMLoss:
    """Next-token cross entropy over labelled positions, through the LM head without full logits (loss.py).

    `liger` uses Liger Kernel's fused linear cross entropy instead of the chunked one (CUDA).
    """

    liger: bool = False

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(trained_positions(batch).sum())

    def __call__(self, model: LocalLearningLM, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum, _ = causal_lm_loss_sum(hidden, model.parts.head, batch["labels"], liger=self.liger)
        return loss_sum


class FrozenStartingModel:
    """The KL reference as a frozen second copy of the starting weights, in eval mode (its memory: one model)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.parts = model_parts(model)

    @torch.no_grad()
    def __call__(self, policy: LocalLearningLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = backbone_hidden_states(
            self.parts.backbone, batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        )
        return hidden, self.parts.head.weight


class AdaptersDisabled:
    """The KL reference as the policy's own frozen base with its LoRA adapters switched off: no extra weights."""

    @torch.no_grad()
    def __call__(self, policy: LocalLearningLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with policy.model.disable_adapter():
            hidden = policy.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        return hidden, policy.parts.head.weight


@dataclass(frozen=True)
class KLRegularizedLoss(CausalLMLoss):
    """Cross entropy + beta x KL(model || reference) per trained token (the InstructGPT-style penalty that
    keeps SFT near its starting model). `reference(policy, batch)` gives the reference's final hidden
    states and LM-head weight; both losses apply the head chunk by chunk, never to the whole batch."""

    beta: float = 0.0
    reference: FrozenStartingModel | AdaptersDisabled | None = None

    def __call__(self, model: LocalLearningLM, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossTerms:
        cross_entropy = super().__call__(model, hidden, batch)
        ref_hidden, ref_weight = self.reference(model, batch)
        keep = trained_positions(batch)
        kl = chunked_kl_sum(hidden[:, :-1][keep], model.parts.head.weight, ref_hidden[:, :-1][keep], ref_weight)
        return LossTerms(objective=cross_entropy + self.beta * kl, logged={"task_loss": cross_entropy, "kl": kl})
