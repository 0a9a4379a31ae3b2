"""TRL's logs and events as lopt's metrics contract (training/metrics.py) and listeners (training/callbacks.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lopt.output import console
from lopt.recipes.trl.arguments import trl_metric
from lopt.recipes.trl.mixin import TASK_LOSS_KEY, WINDOW_FIELDS
from lopt.training.callbacks import Callback, Callbacks, MetricsFile, ProgressBar, RunInfo
from lopt.training.metrics import StepMetrics
from lopt.training.trackers import (
    AUX_LOSS_KEY,
    BLOCK_GRAD_NORM_KEY,
    lopt_key,
)


class TRLBridge(TrainerCallback):
    """TRL's TrainerCallback events -> lopt's listeners (training/callbacks.py), with each logged step as
    the StepMetrics record of the metrics contract (training/metrics.py), read from TRL's logs.

    `recipe` is the recipe's record (recipes/registry.py): its own metrics.jsonl columns, each with the key of
    TRL's logs it comes from, and its validation columns. The mixin's `log` has put the other fields in the logs
    (`_ContractClock`): `activation_peak_bytes` is the peak of bytes saved for backward over the logging window;
    `lr` and `lr_k1` are the rates of the last optimizer step. Only the main process tells the listeners.

    A step that validates is always logged: the Trainer logs the training values first, then validates, so
    that step's row waits for the validation (`on_evaluate`) and holds its values too.
    """

    def __init__(self, trainer, recipe, listeners: list[Callback]):
        self.trainer, self.recipe, self.columns = trainer, recipe, recipe.trl_keys()
        self.callbacks = Callbacks(listeners)
        self.pending: StepMetrics | None = None  # a validating step's row, until the validation's values come

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            lopt = self.trainer.lopt
            self.callbacks.on_train_begin(
                RunInfo(
                    recipe=self.recipe.name, method="e2e" if lopt.settings is None else "lopt",
                    blocks=list(lopt.blocks),
                    backward=self.trainer.lopt_backward, total_steps=state.max_steps, start_step=state.global_step,
                    output_dir=Path(args.output_dir), world_size=self.trainer.accelerator.num_processes,
                )
            )  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            control.should_log = True  # on every process: the Trainer's logging gathers the loss across them
        if state.is_world_process_zero:
            self.callbacks.on_step_end(state.global_step, self.trainer.last_task_loss)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or TASK_LOSS_KEY not in logs:
            return  # the end-of-training summary and evaluation logs carry no step metrics
        self._flush()  # a row still waiting for a validation that did not come
        window = {name: logs[lopt_key(name)] for name in WINDOW_FIELDS}
        blocks = range(1, len(self.trainer.lopt.aux_heads) + 1)
        row = StepMetrics(
            step=state.global_step, epoch=logs.get("epoch"), task_loss=logs[TASK_LOSS_KEY],
            aux_loss=[logs.get(AUX_LOSS_KEY.format(i)) for i in blocks], grad_norm=logs.get("grad_norm"), **window,
            block_grad_norm=_block_grad_norms(logs),
            recipe={column: logs.get(key) for column, key in self.columns.items()}
            | dict.fromkeys(self.recipe.eval_columns),
        )  # fmt: skip
        self.pending = row
        if not control.should_evaluate:
            self._flush()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        row, self.pending = self.pending, None
        if row is None:
            return  # not the main process
        blocks = range(1, len(self.trainer.lopt.aux_heads) + 1)
        row.eval_task_loss = metrics.get("eval_loss")
        row.eval_aux_loss = [metrics.get("eval_" + AUX_LOSS_KEY.format(i)) for i in blocks]
        for column in self.recipe.eval_columns:
            row.recipe[column] = metrics.get(trl_metric(column, self.columns))
        self.callbacks.on_log(row)

    def _flush(self) -> None:
        if self.pending is not None:
            row, self.pending = self.pending, None
            self.callbacks.on_log(row)

    def on_save(self, args, state, control, **kwargs):
        # The mixin's _save_checkpoint has completed the folder (training_state.pt written last) by now.
        if state.is_world_process_zero:
            self.callbacks.on_save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._flush()  # a row whose validation never came (the run failed in it)
            self.callbacks.on_train_end(state.global_step)


def _block_grad_norms(logs: dict) -> list[float] | None:
    """The logged step's per-block gradient norms (LoptTrainerMixin.log put them there); None where not clipped."""
    norms = []
    while BLOCK_GRAD_NORM_KEY.format(len(norms) + 1) in logs:
        norms.append(logs[BLOCK_GRAD_NORM_KEY.format(len(norms) + 1)])
    return norms or None


def add_lopt_callbacks(trainer, recipe, append: bool, listeners: Sequence[Callback] = ()) -> None:
    """Write metrics.jsonl (a resumed run appends) and tell `listeners`, through one TRLBridge. lopt's progress
    (its bar or log lines, or a listener that draws progress itself: the dashboard) replaces the Trainer's
    console bar and log dicts, so every recipe shows the same progress and fields."""
    for console_logger in (ProgressCallback, PrinterCallback):  # the Trainer adds one, as its verbosity says
        trainer.remove_callback(console_logger)
    drawn = any(listener.draws_progress for listener in listeners)
    progress = [] if drawn or not trainer.is_world_process_zero() else [ProgressBar(console)]
    trainer.add_callback(TRLBridge(trainer, recipe, [*progress, MetricsFile(append=append), *listeners]))
