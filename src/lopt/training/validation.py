"""Validation during training: the validation losses after a step, measured on every process.

`evaluate` (step.py) is training's forward without gradients; this runs it over this process's share of the
validation records (`data.order.eval_batches`: every process runs as many forwards, as sharded models need),
inside the backend's autocast, and refuses losses that are not finite.
"""

from __future__ import annotations

import math
import time

from lopt.data.collate import collate
from lopt.data.order import eval_batches
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.parallel import distributed
from lopt.parallel.backend import ParallelBackend
from lopt.training.step import EvalResult, evaluate
from lopt.training.task_loss import TaskLoss


def validate(
    model: LocalLearningLM,
    examples: list[dict],
    pad_token_id: int,
    batch_size: int,
    backend: ParallelBackend,
    task_loss: TaskLoss,
    step: int,
) -> tuple[EvalResult, float]:
    """The validation losses over the tokenized `examples` after `step` (every process takes part), and the
    seconds they took."""
    start = time.perf_counter()
    with backend.autocast():
        result = evaluate(
            model, _batches(examples, pad_token_id, batch_size, backend), task_loss, backend.lm_head_context
        )
    backend.end_evaluation(model)
    losses = [result.task_loss, *result.aux_losses]
    if not all(math.isfinite(v) for v in losses):
        raise LoptError(
            f"The validation losses after step {step} are not finite ({', '.join(map(str, losses))}): the weights "
            "give NaN or infinite outputs on the validation records. Lower --learning_rate / --lr_k1, or use --bf16 "
            "instead of --fp16; the last checkpoint is kept."
        )
    return result, time.perf_counter() - start


def _batches(examples: list[dict], pad_token_id: int, batch_size: int, backend: ParallelBackend):
    """This process's validation batches (`eval_batches`), collated on its device, with whether each counts."""
    world, rank = distributed.world_size(), distributed.rank()
    for indices, counted in eval_batches(len(examples), batch_size, world, rank):
        batch = collate([examples[i] for i in indices], pad_token_id)
        yield {k: v.to(backend.device) for k, v in batch.items()}, counted
