"""Listeners of a training run: what the loop tells, and the listeners lopt ships.

The SFT loop calls these events itself; the TRL recipes (GRPO, DPO) reach them through
`TRLBridge` in recipes/trl/bridge.py, which turns TRL's `TrainerCallback` events into the same calls.
The progress bar and the metrics file are listeners like any other, so a dashboard or a tracker is
one more `Callback` in the list, with no change to any loop.

Events, in order: `on_train_begin(run)` once; per optimizer step `on_step_end(step, task_loss)`, then
`on_log(metrics)` on logging steps and `on_save(checkpoint)` after a checkpoint is complete;
`on_train_end(step)` once, also when a signal stops the run; `on_model_saved(folder)` once the final model is
complete in the run's folder (not after a stopped run). Only the main process calls them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lopt.output import plural
from lopt.training.metrics import MetricsWriter, StepMetrics


@dataclass
class RunInfo:
    """What a run is, for listeners: told once, at the start."""

    recipe: str  # the name of its record in recipes/registry.py: sft, grpo, dpo, ...
    method: str  # e2e or lopt
    blocks: list[range]  # each block's decoder layers (one block for E2E)
    backward: str  # local or joint
    total_steps: int
    start_step: int  # > 0 when resumed
    output_dir: Path
    world_size: int = 1
    backend: str = "replicated"  # replicated, FSDP2, DeepSpeed ZeRO-n
    details: dict[str, object] = field(default_factory=dict)  # the recipe's own (data, examples, ...)


class Callback:
    """Override the events a listener needs; the others do nothing."""

    # True for a listener that shows the run's progress itself (the dashboard): the plain progress bar
    # and TRL's console logs then stay off the screen it draws.
    draws_progress = False

    def on_train_begin(self, run: RunInfo) -> None:
        pass

    def on_step_end(self, step: int, task_loss: float) -> None:
        pass

    def on_log(self, metrics: StepMetrics) -> None:
        pass

    def on_save(self, checkpoint: Path) -> None:
        pass

    def on_train_end(self, step: int) -> None:
        pass

    def on_model_saved(self, folder: Path) -> None:
        pass


class Callbacks(Callback):
    """Calls each listener in turn, in the order given."""

    def __init__(self, listeners: list[Callback]):
        self.listeners = list(listeners)

    def on_train_begin(self, run: RunInfo) -> None:
        for listener in self.listeners:
            listener.on_train_begin(run)

    def on_step_end(self, step: int, task_loss: float) -> None:
        for listener in self.listeners:
            listener.on_step_end(step, task_loss)

    def on_log(self, metrics: StepMetrics) -> None:
        for listener in self.listeners:
            listener.on_log(metrics)

    def on_save(self, checkpoint: Path) -> None:
        for listener in self.listeners:
            listener.on_save(checkpoint)

    def on_train_end(self, step: int) -> None:
        for listener in self.listeners:
            listener.on_train_end(step)

    def on_model_saved(self, folder: Path) -> None:
        for listener in self.listeners:
            listener.on_model_saved(folder)


class MetricsFile(Callback):
    """Writes every logged step to `metrics.jsonl` in the run's folder (a resumed run appends)."""

    def __init__(self, append: bool = False):
        self.append = append
        self.writer: MetricsWriter | None = None

    def on_train_begin(self, run: RunInfo) -> None:
        self.writer = MetricsWriter(run.output_dir / "metrics.jsonl", append=self.append)

    def on_log(self, metrics: StepMetrics) -> None:
        self.writer.write(metrics)

    def on_train_end(self, step: int) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar(Callback):
    """The run's progress on `console`: a bar on a terminal; in a log file (stdout redirected, a Slurm or
    nohup log) one line per logged step with the contract's fields, so a log reads like the terminal did.
    Every recipe shows this same progress (the TRL ones instead of the Trainer's bar and log dicts)."""

    def __init__(self, console):
        self.console = console
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.total = 0
        self.start = 0.0

    def on_train_begin(self, run: RunInfo) -> None:
        self.total, self.start = run.total_steps, time.perf_counter()
        if self.console.is_terminal:
            self.progress.start()
            self.task = self.progress.add_task("training", total=run.total_steps, completed=run.start_step)
        else:
            resumed = f", resuming after step {run.start_step}" if run.start_step else ""
            self.console.print(f"training: {plural(run.total_steps, 'step')}{resumed}", highlight=False)

    def on_step_end(self, step: int, task_loss: float) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=step, description=f"training  loss {task_loss:.4f}")

    def on_log(self, metrics: StepMetrics) -> None:
        # on a terminal the bar shows the training loss; a validation's values are printed above it
        if self.task is None or metrics.eval_task_loss is not None:
            self.console.print(progress_line(metrics, self.total), highlight=False)

    def on_save(self, checkpoint: Path) -> None:
        self.console.print(f"saved {checkpoint}", highlight=False)  # above the bar on a terminal

    def on_train_end(self, step: int) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None
        self.console.print(f"trained to step {step} of {self.total} in {_clock(time.perf_counter() - self.start)}")


def progress_line(metrics: StepMetrics, total_steps: int) -> str:
    """One logged step as a line: step, losses (validation ones too), learning rates, gradient norm, speed, the
    recipe's columns."""
    parts = [f"step {metrics.step}/{total_steps}", f"task loss {metrics.task_loss:.4f}"]
    if metrics.aux_loss:
        parts.append("local " + _losses(metrics.aux_loss))
    if metrics.eval_task_loss is not None:
        parts.append(f"eval task loss {metrics.eval_task_loss:.4f}")
        if metrics.eval_aux_loss:
            parts.append("eval local " + _losses(metrics.eval_aux_loss))
    rates = f"lr {metrics.lr:.2e}" + (f" / {metrics.lr_k1:.2e}" if metrics.lr_k1 != metrics.lr else "")
    parts.append(rates)
    if metrics.grad_norm is not None:
        parts.append(f"grad norm {metrics.grad_norm:.3f}")
    parts.append(f"{metrics.tokens_per_s:,.0f} tokens/s")
    parts += [f"{name} {value:.3f}" for name, value in metrics.recipe.items() if isinstance(value, int | float)]
    parts.append(_clock(metrics.elapsed_s))
    return " | ".join(parts)


def _losses(values: list[float | None]) -> str:
    return " ".join("-" if v is None else f"{v:.4f}" for v in values)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
