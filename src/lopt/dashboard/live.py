"""The live dashboard: a listener that draws the run full screen from a thread, never slowing training.

The training loop's events (training/callbacks.py) are put on a bounded queue without waiting; when
the queue is full the update is dropped and counted (metrics.jsonl is written by its own listener, so
nothing is lost on disk). A daemon thread drains the queue into a DashboardState, follows the run's
completions.jsonl (GRPO), samples the hardware once a second and redraws a few times a second. While
it runs, the process's terminal output becomes events (capture.py). `on_train_end` (which the
recipes call from a `finally`) stops the thread, which leaves the full screen, and prints a summary
that stays; `stop()` is idempotent and also runs at interpreter exit, so the terminal is restored
however the run ends.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.live import Live

from lopt.dashboard.capture import TerminalCapture
from lopt.dashboard.follow import JsonlFollower
from lopt.dashboard.hardware import HardwareSampler
from lopt.dashboard.panels import DashboardView, summary
from lopt.dashboard.state import DashboardState, StudyRun
from lopt.recipes.registry import recipe_record
from lopt.runs import COMPLETIONS, TRAINING_ARGS, read_json_if_complete
from lopt.training.callbacks import Callback, RunInfo
from lopt.training.metrics import StepMetrics

HARDWARE_PERIOD_S = 1.0


def tui_enabled(flag: bool | None, stream: TextIO) -> bool:
    """Whether to show the dashboard on `stream`: `flag` (--tui / --no-tui) when given, else LOPT_TUI=1.

    Never on a stream that is not a terminal (redirected to a file or a pipe) or a dumb terminal: then
    it says why on stderr, once, and the run keeps its plain progress output. Ranks other than 0 of a
    multi-process run answer False quietly (only the main process draws)."""
    wanted = flag if flag is not None else os.environ.get("LOPT_TUI") == "1"
    if not wanted or os.environ.get("RANK", "0") != "0":
        return False
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty():
        why = "the output is not a terminal (redirected to a file or a pipe)"
    elif os.environ.get("TERM") == "dumb":
        why = "TERM=dumb cannot draw it"
    else:
        return True
    print(f"lopt: dashboard off: {why}; showing the plain progress instead", file=sys.stderr)
    return False


class Dashboard(Callback):
    """The full-screen dashboard of a run, drawn on `stream` (default: sys.stderr, where lopt's progress goes).

    On a stream that is not a terminal it takes no screen: it follows the run the same way and prints
    only the summary at the end. `force_terminal` overrides the detection (tests). `log_level`: log
    records at or above it are shown as events. `e2e_activation_bytes` and `study` are shown as given
    and may be changed between runs (a Dashboard can follow several runs in turn, as `lopt demo` does):
    through `self.state`, whose values carry over to the next run.
    """

    draws_progress = True

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        force_terminal: bool | None = None,
        refresh_per_second: float = 4.0,
        log_level: int | str = logging.WARNING,
        queue_size: int = 1024,
        e2e_activation_bytes: int | None = None,
        study: list[StudyRun] | None = None,
    ):
        # the stream is fixed now: once the capture replaces sys.stderr, looking it up would draw into it
        self.console = Console(file=stream or sys.stderr, force_terminal=force_terminal)
        self.period_s = 1.0 / refresh_per_second
        self.log_level = log_level
        self.updates: queue.Queue[tuple[Callable, tuple]] = queue.Queue(maxsize=queue_size)
        self.state = DashboardState(e2e_activation_bytes=e2e_activation_bytes, study=list(study or []))
        self.dropped = 0  # updates dropped because the queue was full
        self._latest_metrics: StepMetrics | None = None  # the summary's numbers, even if the last update was dropped
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._capture: TerminalCapture | None = None
        self._render_error: str | None = None
        self._started_at = 0.0  # time.monotonic() when drawing started: the run's elapsed time

    # Listener events: queued, never waited on.

    def _post(self, update: Callable, *args) -> None:
        try:
            self.updates.put_nowait((update, args))
        except queue.Full:
            self.dropped += 1

    def _post_event(self, kind: str, text: str) -> None:
        self._post(DashboardState.record_event, kind, text)

    def on_train_begin(self, run: RunInfo) -> None:
        self.stop()  # a Dashboard reused for the next run (lopt demo) starts afresh
        self.state = DashboardState.for_run(run, previous=self.state)
        self.dropped, self._latest_metrics = 0, None
        self.start()

    def on_step_end(self, step: int, task_loss: float) -> None:
        self._post(DashboardState.record_step, step, task_loss)

    def on_log(self, metrics: StepMetrics) -> None:
        self._latest_metrics = metrics
        self._post(DashboardState.record_metrics, metrics)

    def on_save(self, checkpoint: Path) -> None:
        self._post(DashboardState.record_checkpoint, checkpoint)

    def on_train_end(self, step: int) -> None:
        if self.stop():
            self.state.end(step)
            self.console.print(summary(self.state))

    # The render thread.

    def start(self) -> None:
        """Start drawing `self.state` (on_train_begin calls it)."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._render_error = None
        self._started_at = time.monotonic()
        # with no screen to protect, the process's output stays where it goes
        self._capture = TerminalCapture(self._post_event, self.log_level) if self.console.is_terminal else None
        if self._capture is not None:
            self._capture.install()
        self._thread = threading.Thread(target=self._render_loop, name="lopt-dashboard", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # an exit that skips on_train_end still leaves the full screen

    def stop(self) -> bool:
        """Stop drawing and give the terminal back; False when it was not running. Idempotent."""
        thread = self._thread
        if thread is None:
            return False
        self._thread = None
        atexit.unregister(self.stop)
        if self._capture is not None:
            self._capture.uninstall()
        self._stopping.set()
        thread.join(timeout=10)
        latest = self._latest_metrics
        if latest is not None and (self.state.metrics is None or self.state.metrics.step < latest.step):
            self.state.record_metrics(latest)
        if self._render_error is not None:
            print(f"lopt: the dashboard stopped drawing: {self._render_error}", file=sys.stderr)
        return True

    def _render_loop(self) -> None:
        screen = Live(
            console=self.console, screen=True, auto_refresh=False, redirect_stdout=False, redirect_stderr=False
        )
        completions: JsonlFollower | None = None
        recipe = recipe_record(self.state.recipe)
        if recipe is not None and recipe.data == "prompts" and self.state.run is not None:  # GRPO, RLOO: their samples
            completions = JsonlFollower(self.state.run.output_dir / COMPLETIONS)
        sampler = HardwareSampler()
        next_sample = 0.0
        try:
            with screen if self.console.is_terminal else contextlib.nullcontext():
                while True:
                    changed = self._apply_updates(completions)
                    if time.monotonic() >= next_sample:  # also moves the elapsed clock: a frame a second at least
                        self.state.record_hardware(sampler.sample())
                        next_sample, changed = time.monotonic() + HARDWARE_PERIOD_S, True
                    if changed and self.console.is_terminal:  # a frame costs ~15 ms of the GIL: only when it differs
                        screen.update(DashboardView(self.state), refresh=True)
                    if self._stopping.wait(self.period_s):
                        break
                self._apply_updates(completions)
        except Exception:  # a drawing bug must not take the terminal or the training down with it
            self._render_error = traceback.format_exc(limit=-3)
            if self._capture is not None:
                self._capture.uninstall()
        finally:
            sampler.close()

    def _apply_updates(self, completions: JsonlFollower | None) -> bool:
        """Apply what was queued and what the run's files add; whether the state changed."""
        state, changed = self.state, False
        for _ in range(self.updates.maxsize or 1024):
            try:
                update, args = self.updates.get_nowait()
            except queue.Empty:
                break
            update(state, *args)
            changed = True
        state.elapsed_s = time.monotonic() - self._started_at
        state.dropped_updates = self.dropped
        if state.args is None and state.run is not None:
            state.args = read_json_if_complete(state.run.output_dir / TRAINING_ARGS)
            changed = changed or state.args is not None
        for row in completions.read_new() if completions is not None else []:
            state.record_completion(row)
            changed = True
        return changed
