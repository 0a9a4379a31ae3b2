"""Listeners of a training run: what the loop tells, and the listeners lopt ships.

The SFT loop calls these events itself; the TRL recipes (GRPO, DPO) reach them through
`TRLBridge` in trl_integration.py, which turns TRL's `TrainerCallback` events into the same calls.
The progress bar and the metrics file are listeners like any other, so a dashboard or a tracker is
one more `Callback` in the list, with no change to any loop.

Events, in order: `on_train_begin(run)` once; per optimizer step `on_step_end(step, task_loss)`, then
`on_log(metrics)` on logging steps and `on_save(checkpoint)` after a checkpoint is complete;
`on_train_end(step)` once, also when a signal stops the run. Only the main process calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lopt.training.metrics import MetricsWriter, StepMetrics


@dataclass
class RunInfo:
    """What a run is, for listeners: told once, at the start."""

    recipe: str  # sft, grpo, dpo
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
    """A rich progress bar on stderr: steps done, the last task loss, time remaining."""

    def __init__(self, console):
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def on_train_begin(self, run: RunInfo) -> None:
        self.progress.start()
        self.task = self.progress.add_task("training", total=run.total_steps, completed=run.start_step)

    def on_step_end(self, step: int, task_loss: float) -> None:
        self.progress.update(self.task, completed=step, description=f"training  loss {task_loss:.4f}")

    def on_train_end(self, step: int) -> None:
        self.progress.stop()
