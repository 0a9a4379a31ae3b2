"""What the dashboard shows, as plain data updated from events; panels.py draws it.

One `DashboardState` serves both feeds: the live dashboard applies listener events (RunInfo, each
step's task loss, StepMetrics, saved checkpoints, log lines) and `lopt watch` applies the rows it reads
from a run's files. Histories are bounded (`Series`), so a long run costs the same memory as a short
one. A step that goes back (a resumed run appending to its files) replaces the history from that step
on, as the resumed run retrains those steps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from lopt.dashboard.hardware import HardwareSample
from lopt.training.callbacks import RunInfo
from lopt.training.metrics import StepMetrics

# Points a series keeps before it halves its resolution: more than the widest sparkline draws.
SERIES_CAPACITY = 512
# Sampled completions kept for the RL panel (the latest few are shown; the per-function means use one step's).
COMPLETIONS_KEPT = 256
EVENTS_KEPT = 200
# The recipe columns (training/metrics.py) whose history the RL panel draws.
RL_SERIES = ("reward", "reward_accuracy", "reward_margin")


def _finite(value) -> bool:
    """A number a chart can draw (a logged null, NaN or inf is left out of the history)."""
    return isinstance(value, int | float) and math.isfinite(value)


class Series:
    """(step, value) points in step order, bounded: when full, neighbouring points are merged in pairs
    (their mean, at the later step), so the whole run stays drawn at a coarser resolution."""

    def __init__(self, capacity: int = SERIES_CAPACITY):
        self.capacity = capacity
        self.points: list[tuple[int, float]] = []

    def put(self, step: int, value: float) -> None:
        """Add the value of `step`; any points at `step` or later (a resumed run's retrained steps) go first."""
        self.rewind(step)
        self.points.append((step, value))
        if len(self.points) > self.capacity:
            pairs = zip(self.points[0::2], self.points[1::2], strict=False)
            merged = [(later[0], (earlier[1] + later[1]) / 2) for earlier, later in pairs]
            self.points = merged + self.points[len(merged) * 2 :]

    def rewind(self, step: int) -> None:
        """Forget the points at `step` and later."""
        while self.points and self.points[-1][0] >= step:
            self.points.pop()

    def values(self) -> list[float]:
        return [value for _, value in self.points]

    def last(self) -> float | None:
        return self.points[-1][1] if self.points else None


@dataclass
class Completion:
    """One row of completions.jsonl: a sampled completion and its rewards."""

    step: int
    prompt: str
    completion: str
    rewards: dict[str, float | None]
    reward: float | None


@dataclass
class Event:
    """One line of the events panel. `kind` is a logging level name (WARNING, ERROR, ...), 'stdout' or
    'stderr' for text the process printed, or 'checkpoint' / 'run' for what the dashboard itself notes."""

    kind: str
    text: str
    when: float = field(default_factory=time.time)


@dataclass
class StudyRun:
    """One run of a study (`lopt demo`): its name and whether it is done, training or pending."""

    name: str
    status: str  # done, training, pending


@dataclass
class DashboardState:
    """Everything the panels show of one run; `record_*` apply events, the methods below derive."""

    run: RunInfo | None = None
    args: dict | None = None  # the run's training_args.json once read (model name, data, epochs)
    step: int = 0  # the last optimizer step taken
    metrics: StepMetrics | None = None  # the last logged step
    task_loss: Series = field(default_factory=Series)
    aux_losses: list[Series] = field(default_factory=list)  # one per non-final block
    eval_task_loss: Series = field(default_factory=Series)  # the validations' (--eval_*), at the steps they ran
    recipe_series: dict[str, Series] = field(default_factory=dict)  # RL_SERIES columns the recipe logs
    completions: deque[Completion] = field(default_factory=lambda: deque(maxlen=COMPLETIONS_KEPT))
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    checkpoints: list[Path] = field(default_factory=list)
    hardware: HardwareSample | None = None
    peak_rss_bytes: int = 0  # the highest process RSS sampled
    peak_mem_bytes: int = 0  # the highest peak_mem_bytes logged
    peak_activation_bytes: int = 0  # the highest activation_peak_bytes logged
    elapsed_s: float = 0.0  # seconds since this launch of the run started
    # (step, elapsed_s) where this launch started: steps per second are counted from here (a resumed
    # launch starts at its checkpoint's step, not at 0)
    launch_start: tuple[int, float] = (0, 0.0)
    finished: bool = False
    last_row_time: float | None = None  # wall-clock time metrics.jsonl was last written (lopt watch)
    dropped_updates: int = 0  # updates the live dashboard dropped because its queue was full
    # Set by the caller, kept across runs: what the E2E baseline's activations took (for "E2E would need"),
    # and the study's runs when the dashboard follows several in turn (lopt demo).
    e2e_activation_bytes: int | None = None
    study: list[StudyRun] = field(default_factory=list)

    @classmethod
    def for_run(cls, run: RunInfo, previous: DashboardState | None = None) -> DashboardState:
        """The state of a run that starts now (live); what the caller set on `previous` carries over."""
        kept = previous or cls()
        return cls(
            run=run,
            step=run.start_step,
            launch_start=(run.start_step, 0.0),
            e2e_activation_bytes=kept.e2e_activation_bytes,
            study=kept.study,
        )

    def record_step(self, step: int, task_loss: float) -> None:
        self.step = step
        if _finite(task_loss):
            self.task_loss.put(step, task_loss)

    def record_metrics(self, metrics: StepMetrics) -> None:
        previous = self.metrics
        if previous is not None and metrics.step <= previous.step:
            self._rewind(metrics.step)
            self.launch_start = (metrics.step, metrics.elapsed_s)
            self.record_event(
                "run", f"step went back to {metrics.step}: a resumed run; its rows replace the later ones"
            )
        elif previous is not None and metrics.elapsed_s < previous.elapsed_s:
            self.launch_start = (previous.step, 0.0)  # a new launch that kept going from the last row's step
        self.metrics = metrics
        self.step = max(self.step, metrics.step)
        self.elapsed_s = metrics.elapsed_s
        if _finite(metrics.task_loss):
            self.task_loss.put(metrics.step, metrics.task_loss)
        while len(self.aux_losses) < len(metrics.aux_loss):
            self.aux_losses.append(Series())
        for series, value in zip(self.aux_losses, metrics.aux_loss, strict=False):
            if _finite(value):
                series.put(metrics.step, value)
        if _finite(metrics.eval_task_loss):
            self.eval_task_loss.put(metrics.step, metrics.eval_task_loss)
        for name in RL_SERIES:
            if _finite(metrics.recipe.get(name)):
                self.recipe_series.setdefault(name, Series()).put(metrics.step, metrics.recipe[name])
        self.peak_mem_bytes = max(self.peak_mem_bytes, metrics.peak_mem_bytes)
        self.peak_activation_bytes = max(self.peak_activation_bytes, metrics.activation_peak_bytes)

    def _rewind(self, step: int) -> None:
        for series in (self.task_loss, *self.aux_losses, self.eval_task_loss, *self.recipe_series.values()):
            series.rewind(step)
        self.step = step

    def record_completion(self, row: dict) -> None:
        """A completions.jsonl row; a step lower than the last row's is a resumed run's, which replaces
        the rows from that step on (several rows share a step: one per sampled completion)."""
        if not isinstance(row.get("step"), int):
            return  # not a row the GRPO recipe wrote
        rewards = row.get("rewards") if isinstance(row.get("rewards"), dict) else {}
        completion = Completion(
            step=row["step"],
            prompt=str(row.get("prompt", "")),
            completion=str(row.get("completion", "")),
            rewards={name: value if _finite(value) else None for name, value in rewards.items()},
            reward=row.get("reward") if _finite(row.get("reward")) else None,
        )
        while self.completions and self.completions[-1].step > completion.step:
            self.completions.pop()
        self.completions.append(completion)

    def record_event(self, kind: str, text: str) -> None:
        self.events.append(Event(kind, text))

    def record_checkpoint(self, checkpoint: Path) -> None:
        self.checkpoints.append(checkpoint)
        self.record_event("checkpoint", f"checkpoint saved: {checkpoint}")

    def record_hardware(self, sample: HardwareSample) -> None:
        self.hardware = sample
        if sample.rss_bytes is not None:
            self.peak_rss_bytes = max(self.peak_rss_bytes, sample.rss_bytes)

    def end(self, step: int) -> None:
        self.step, self.finished = step, True

    # What the panels derive from the above.

    @property
    def recipe(self) -> str:
        return self.run.recipe if self.run is not None else "sft"

    @property
    def num_blocks(self) -> int:
        """k: from the run's blocks, else the logged reconstruction losses (k - 1 of them)."""
        if self.run is not None and self.run.blocks:
            return len(self.run.blocks)
        if self.metrics is not None:
            return len(self.metrics.aux_loss) + 1
        return 1

    def total_steps(self) -> tuple[int | None, bool]:
        """(total steps, estimated): the run's own count, else one estimated from the epoch reached
        (--num_train_epochs with no --max_steps: the run's files do not say how many steps an epoch is)."""
        if self.run is not None and self.run.total_steps > 0:
            return self.run.total_steps, False
        epochs = (self.args or {}).get("num_train_epochs")
        if self.metrics is not None and self.metrics.epoch and epochs:
            return max(self.step, math.ceil(self.metrics.step / self.metrics.epoch * epochs)), True
        return None, False

    def seconds_per_step(self) -> float | None:
        start_step, start_elapsed = self.launch_start
        if self.step <= start_step or self.elapsed_s <= start_elapsed:
            return None
        return (self.elapsed_s - start_elapsed) / (self.step - start_step)

    def eta_s(self) -> float | None:
        total, _ = self.total_steps()
        per_step = self.seconds_per_step()
        if total is None or per_step is None or self.finished:
            return None
        return max(total - self.step, 0) * per_step

    def newest_step_completions(self) -> list[Completion]:
        """The completions of the newest step in the window (their per-function means are shown)."""
        if not self.completions:
            return []
        newest = self.completions[-1].step
        return [c for c in self.completions if c.step == newest]
