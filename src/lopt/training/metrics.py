"""The step-metrics contract: one record type, one writer, one description of every field.

Every recipe writes `metrics.jsonl` in its `--output_dir` through `MetricsWriter`: one JSON object
per logged optimizer step, with the common fields below in this order, then the validation fields
(`EVAL_FIELDS`), then the recipe's own columns and its validation columns (both declared in the recipe's record,
recipes/registry.py). A step that validates (--eval_*) is always logged, and its row holds the
validation values; every other row holds null there, so each row has the same columns and a reader
that knows no validation reads the rows as before (files written before validation existed lack the
validation columns, and files written before a field of `LATER_FIELDS` existed lack that field).
Reports, benchmarks, the dashboard and trackers read these files (or the `StepMetrics` records the
callbacks receive), never a recipe's private state, so a new recipe that writes this contract is
shown by all of them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# The common fields, in file order, with what each holds.
FIELDS: dict[str, str] = {
    "step": "optimizer step just taken (1-based)",
    "epoch": "epochs completed at the end of this step, fractional",
    "task_loss": "the final block's objective for this step (SFT: mean next-token cross entropy over trained "
    "tokens; GRPO/DPO: TRL's loss, averaged over the logging window)",
    "aux_loss": "LoPT: each non-final block's mean local reconstruction loss, one per block ([] for E2E)",
    "lr": "learning rate the step used for the final block, final norm and LM head (all of E2E)",
    "lr_k1": "learning rate the step used for the embeddings, early blocks and reconstruction heads",
    "grad_norm": "global gradient norm before clipping (null where the trainer did not report one)",
    "block_grad_norm": "each block's gradient L2 norm before clipping, one per block, block 1 first: block 1's "
    "includes the embeddings, each non-final block's its reconstruction head, the final block's the final norm and "
    "LM head; their squares sum to grad_norm's square (E2E: one entry, grad_norm; null where the trainer did not "
    "report them: lopt sft under DeepSpeed, GRPO/DPO/reward models with --max_grad_norm 0)",
    "tokens_per_s": "input tokens per second since the previous logged step, all processes",
    "peak_mem_bytes": "peak device memory so far: CUDA max allocated, or the process's peak RSS on CPU",
    "activation_peak_bytes": "peak bytes saved for backward during the logged steps (deterministic)",
    "elapsed_s": "seconds since training started (this process, this launch)",
}
# Common fields added after the first release: files written before them lack them, and readers take them as null.
LATER_FIELDS = ("block_grad_norm",)

# The validation fields after the common ones: values in the rows of steps that validated, null in the others.
EVAL_FIELDS: dict[str, str] = {
    "eval_task_loss": "the task loss on the validation records, as task_loss is on the training ones (SFT: mean per "
    "trained token over all of them; GRPO/DPO: TRL's eval_loss)",
    "eval_aux_loss": "LoPT: each non-final block's local loss on the validation records ([] for E2E; SFT: mean per "
    "real token over all of them; GRPO/DPO: mean over the validation batches, as TRL averages its metrics)",
}


@dataclass
class StepMetrics:
    """One line of metrics.jsonl (see FIELDS for what each field holds)."""

    step: int
    epoch: float | None
    task_loss: float
    aux_loss: list[float | None]
    lr: float
    lr_k1: float
    grad_norm: float | None
    tokens_per_s: float
    peak_mem_bytes: int
    activation_peak_bytes: int
    elapsed_s: float
    eval_task_loss: float | None = None  # None but on steps that validated
    eval_aux_loss: list[float | None] | None = None
    block_grad_norm: list[float] | None = None  # a LATER_FIELDS field: defaulted, so every writer writes its column
    recipe: dict[str, float | None] = field(default_factory=dict)  # the recipe's own columns, validation ones after

    def to_json(self) -> dict:
        """The metrics.jsonl row: the fields in the contract's order (FIELDS, EVAL_FIELDS), then the recipe's."""
        return {**{name: getattr(self, name) for name in (*FIELDS, *EVAL_FIELDS)}, **self.recipe}


def contract_errors(row: dict, recipe) -> list[str]:
    """What in a metrics.jsonl row breaks the contract for `recipe`, a recipe's record (recipes/registry.py: its
    `columns` and `eval_columns`); empty when it holds."""
    expected = [*FIELDS, *EVAL_FIELDS, *recipe.columns, *recipe.eval_columns]
    errors = []
    if list(row) != expected:
        errors.append(f"columns {list(row)} differ from the contract's {expected}")
    for name in ("step", "peak_mem_bytes", "activation_peak_bytes"):
        if not isinstance(row.get(name), int) or row[name] < 0:
            errors.append(f"{name} must be a non-negative integer, got {row.get(name)!r}")
    for name in ("task_loss", "lr", "lr_k1", "tokens_per_s", "elapsed_s"):
        value = row.get(name)
        if not isinstance(value, int | float) or not math.isfinite(value):
            errors.append(f"{name} must be a finite number, got {value!r}")
    if not isinstance(row.get("aux_loss"), list):
        errors.append(f"aux_loss must be a list (one entry per non-final block), got {row.get('aux_loss')!r}")
    norms = row.get("block_grad_norm")
    if norms is not None and not (
        isinstance(norms, list) and norms and all(isinstance(n, int | float) and n >= 0 for n in norms)
    ):
        errors.append(f"block_grad_norm must be null or a list of norms >= 0, one per block; got {norms!r}")
    eval_loss, eval_aux = row.get("eval_task_loss"), row.get("eval_aux_loss")
    if eval_loss is not None and (not isinstance(eval_loss, int | float) or not math.isfinite(eval_loss)):
        errors.append(f"eval_task_loss must be a finite number or null, got {eval_loss!r}")
    if (eval_loss is None) != (eval_aux is None):
        errors.append(f"eval_task_loss and eval_aux_loss are null together, got {eval_loss!r} and {eval_aux!r}")
    elif eval_aux is not None and (not isinstance(eval_aux, list) or len(eval_aux) != len(row.get("aux_loss") or [])):
        errors.append(f"eval_aux_loss must be a list with one entry per non-final block, as aux_loss; got {eval_aux!r}")
    if eval_loss is None:
        filled = [name for name in recipe.eval_columns if row.get(name) is not None]
        if filled:
            errors.append(f"{', '.join(filled)} hold values in a row without validation (eval_task_loss null)")
    return errors


class MetricsWriter:
    """Appends StepMetrics to metrics.jsonl, one flushed line each (a crash loses no logged step).

    A new run starts the file afresh; a resumed run (`append`) continues it.
    """

    def __init__(self, path: Path, append: bool = False):
        self.path = Path(path)
        self._file = self.path.open("a" if append else "w")

    def write(self, metrics: StepMetrics) -> None:
        self._file.write(json.dumps(metrics.to_json()) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
