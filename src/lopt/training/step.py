"""One optimizer step: forward and backward over the micro-batches of an accumulation window.

Local backward (the default) back-propagates each block's local loss as soon as the block has run,
then the task loss through the final block only. Joint backward (the reference implementation's
behaviour, kept for comparison) sums everything and calls backward once, keeping every block's
activations alive until then. Both give the same gradients.

The model is never wrapped in DistributedDataParallel: DDP expects one backward per forward, and
local backward runs k of them. Gradients are averaged across processes explicitly after the window
instead, which gives the same result as one process on the global batch.

`train_step` is one whole optimizer step of a plain loop: `forward_backward`, then the parallel backend's step
(reduce, clip, check, apply), or with --block_step each block's step right after its backward. `evaluate` runs
the same forward on validation records, without gradients, for the validation losses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from lopt.errors import LoptError, unknown_choice
from lopt.models.local_learning import LocalLearningLM
from lopt.parallel.backend import ParallelBackend
from lopt.parallel.distributed import all_reduce_sum, world_size
from lopt.training.task_loss import CausalLMLoss, LossTerms, TaskLoss

BACKWARD_MODES = ("local", "joint")


@dataclass
class StepResult:
    task_loss: float  # the task loss's mean over the window's units (SFT: cross entropy per trained token)
    aux_losses: list[float]  # mean local loss per non-final block
    tokens: int  # units the task loss counted in the window (trained tokens), this process
    input_tokens: int  # all non-padding tokens in the window, this process
    terms: dict[str, float] = field(default_factory=dict)  # a LossTerms task loss's other parts (kl), window means


def forward_backward(
    model: LocalLearningLM,
    micro_batches: list[dict[str, torch.Tensor]],
    backward: str | None = None,
    run_backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    task_loss: TaskLoss | None = None,
    lm_head_context: Callable[[], AbstractContextManager] = nullcontext,
    step_block: Callable[[int], None] | None = None,
) -> StepResult:
    """Accumulate the gradients of one optimizer step over `micro_batches`.

    The task loss (`task_loss`, default: causal LM cross entropy) is normalized by the number of its
    units (trained tokens) in the whole window, on all processes, so a window split into micro-batches
    or across processes gives the gradient of the same global mean. Each block's local loss is a
    per-micro-batch mean, averaged over the window. `run_backward` back-propagates one loss (the
    parallel backend's: through the fp16 loss scaler or DeepSpeed's engine when they are used);
    `lm_head_context` is entered around the task loss and its backward (ZeRO-3 gathers the LM head's
    weight there). `backward` (local or joint) defaults to the wrapper's LoPT settings' (`model.backward_mode`).
    `step_block(block)` (--block_step) runs right after each block's backward, the final block's
    after the task loss's: with local backward and one micro-batch, that block's gradients are final there.
    """
    backward = backward or model.backward_mode
    if backward not in BACKWARD_MODES:
        raise unknown_choice("--backward", backward, BACKWARD_MODES)
    if step_block is not None and (backward != "local" or len(micro_batches) != 1):
        raise LoptError("--block_step needs --backward local and one micro-batch a step (no accumulation)")
    task_loss = task_loss or CausalLMLoss()
    device = micro_batches[0]["input_ids"].device
    local_units = sum(task_loss.units(mb) for mb in micro_batches)
    global_units = all_reduce_sum(local_units, device)
    if global_units == 0:
        raise LoptError("No trained tokens in this step: every example's response was masked or truncated.")
    micro_weight = 1.0 / (len(micro_batches) * world_size())
    aux_weight = model.lambda_aux / max(len(model.aux_heads), 1) * micro_weight

    task_sum, aux_sums, term_sums = 0.0, [0.0] * len(model.aux_heads), {}
    for batch in micro_batches:
        local = run_backward if backward == "local" else None
        with model.boundary_step(local, aux_weight, batch["attention_mask"], after_backward=step_block) as aux_losses:
            hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        with lm_head_context():
            loss = task_loss(model, hidden, batch)
            terms = loss if isinstance(loss, LossTerms) else LossTerms(loss, {})
            objective = terms.objective / global_units
            if local is None and aux_losses:
                objective = objective + aux_weight * torch.stack(aux_losses).sum()
            run_backward(objective)
        if step_block is not None:
            step_block(model.num_blocks - 1)
        task_sum += float(terms.logged.get("task_loss", terms.objective).detach())
        for name, value in terms.logged.items():
            if name != "task_loss":
                term_sums[name] = term_sums.get(name, 0.0) + float(value.detach())
        for i, aux in enumerate(aux_losses):
            aux_sums[i] += float(aux.detach()) / len(micro_batches)
    return StepResult(
        task_loss=all_reduce_sum(task_sum, device) / global_units,
        aux_losses=[all_reduce_sum(a, device) / world_size() for a in aux_sums],
        tokens=local_units,
        input_tokens=sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
        terms={name: all_reduce_sum(value, device) / global_units for name, value in term_sums.items()},
    )


@dataclass
class StepTaken:
    """What one optimizer step did: its window's losses, and the gradient norm before clipping, the whole
    gradient's and each block's (None where the backend cannot tell them: DeepSpeed)."""

    result: StepResult
    grad_norm: float
    block_norms: list[float] | None


def train_step(
    model: LocalLearningLM,
    micro_batches: list[dict[str, torch.Tensor]],
    backend: ParallelBackend,
    optimizer: torch.optim.Optimizer,
    task_loss: TaskLoss,
    backward: str,
    step: int,
    block_parameters: list[list[torch.nn.Parameter]] | None = None,
    measure: Callable[[], AbstractContextManager] = nullcontext,
) -> StepTaken:
    """Optimizer step `step`: `forward_backward` over `micro_batches` inside `measure` (an activation meter) and the
    backend's autocast, then `backend.step`, which refuses non-finite values before applying. With
    `block_parameters` (--block_step: each block's, in order) each block steps right after its backward instead, and
    the step's norm is the whole gradient's, checked once every block has stepped."""
    block_norms: list[float] = []

    def step_block(block: int) -> None:
        def check(norm: float) -> None:
            stop_unless_finite({f"gradient norm of block {block + 1}": norm}, step, step_taken=block > 0)

        block_norms.append(backend.step_block(block_parameters[block], optimizer, check))

    with measure(), backend.autocast():
        result = forward_backward(
            model, micro_batches, backward, backend.backward, task_loss, backend.lm_head_context,
            step_block if block_parameters is not None else None,
        )  # fmt: skip
    if block_parameters is None:
        grad_norm, norms = backend.step(model, optimizer, functools.partial(check_finite, result, step=step))
        return StepTaken(result, grad_norm, norms)
    grad_norm = math.sqrt(sum(norm**2 for norm in block_norms))
    check_finite(result, grad_norm, step=step, step_taken=True)
    return StepTaken(result, grad_norm, block_norms)


@dataclass
class EvalResult:
    task_loss: float  # the task loss's mean per unit over the validation records (SFT: per trained token)
    aux_losses: list[float]  # each non-final block's local loss, mean per real (non-padding) token


def evaluate(
    model: LocalLearningLM,
    batches: Iterable[tuple[dict[str, torch.Tensor], bool]],
    task_loss: TaskLoss | None = None,
    lm_head_context: Callable[[], AbstractContextManager] = nullcontext,
) -> EvalResult:
    """The validation losses of `model` over this process's `batches` and every other process's: training's
    forward (the block boundaries' local losses, the task loss through `lm_head_context`), under torch.no_grad
    and in eval mode (no dropout), then back in the mode it was in.

    Each process sums over its batches; the sums are added across processes, then divided by the counts (trained
    tokens for the task loss, real tokens for the local losses), so the result is the mean over all validation
    records, whatever the batches and processes. A batch flagged False is run but not counted: a sharded model's
    forward is a collective, so every process runs as many forwards, and one with fewer records repeats one.
    """
    task_loss = task_loss or CausalLMLoss()
    task_sum, units, tokens, aux_sums = 0.0, 0, 0.0, [0.0] * len(model.aux_heads)
    device = None
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch, counted in batches:
                device = batch["input_ids"].device
                # the task loss runs outside the boundary step, as in training: a reference model's forward
                # through the same layers (the base with adapters disabled) measures no local loss
                with model.boundary_step(None, 0.0, batch["attention_mask"], measure=True) as aux_losses:
                    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
                with lm_head_context():
                    loss = task_loss(model, hidden, batch)
                if not counted:
                    continue
                terms = loss if isinstance(loss, LossTerms) else LossTerms(loss, {})
                task_sum += float(terms.logged.get("task_loss", terms.objective))
                units += task_loss.units(batch)
                real_tokens = float(batch["attention_mask"].sum())
                tokens += real_tokens
                for i, aux in enumerate(aux_losses):
                    aux_sums[i] += float(aux) * real_tokens  # the loss is a mean over the batch's real tokens
    finally:
        model.train(training)
    units = all_reduce_sum(units, device)
    if units == 0:
        raise LoptError(
            "No trained tokens in the validation records: every example's response was masked or truncated. Raise "
            "--max_seq_length, or validate on other records."
        )
    tokens = all_reduce_sum(tokens, device)
    return EvalResult(
        task_loss=all_reduce_sum(task_sum, device) / units,
        aux_losses=[all_reduce_sum(a, device) / tokens for a in aux_sums],
    )


def check_finite(result: StepResult, grad_norm: float, step: int, step_taken: bool = False) -> None:
    """Stop before a poisoned optimizer step (or, with `step_taken`, right after one whose gradient
    norm is only known then); either way the caller keeps the last good checkpoint."""
    values = {"task loss": result.task_loss, "gradient norm": grad_norm, **result.terms}
    values.update({f"aux loss (block {i + 1})": v for i, v in enumerate(result.aux_losses)})
    stop_unless_finite(values, step, step_taken)


def stop_unless_finite(values: dict[str, float], step: int, step_taken: bool = False) -> None:
    """Raise at optimizer step `step` when any of the named values is NaN or infinite."""
    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    if bad:
        detail = ", ".join(f"{name} = {v}" for name, v in bad.items())
        taken = (
            "The optimizer step was already taken (DeepSpeed computes the gradient norm inside its step; "
            "--block_step steps the earlier blocks before the later ones are known), so the weights in memory may "
            "be poisoned; none of them were saved"
            if step_taken
            else "The optimizer step was not taken"
        )
        raise LoptError(
            f"Non-finite values at step {step}: {detail}. {taken}, and no checkpoint of these weights was written. "
            "Lower --learning_rate / --lr_k1 or --lambda_aux, set --max_grad_norm, or use --bf16 instead of --fp16."
        )
