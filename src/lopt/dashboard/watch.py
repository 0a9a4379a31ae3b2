"""`lopt watch RUN_DIR [RUN_DIR ...]`: the dashboard of runs drawn from their files, live or once.

It reads only what a run writes into its --output_dir (training_args.json, metrics.jsonl,
completions.jsonl, checkpoint-N/, the final model's config.json), incrementally, so it follows a run
in another process or on a shared disk, and shows finished ones. One folder: the live dashboard's
panels. Several: side by side, task loss curves on one scale and the memory columns, so E2E and LoPT
compare. A folder with no files yet shows as waiting; a resumed run's appended rows replace the steps
it retrained.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console, RenderableType
from rich.live import Live

from lopt.dashboard.follow import JsonlFollower
from lopt.dashboard.hardware import HardwareSampler
from lopt.dashboard.panels import ComparisonView, DashboardView
from lopt.dashboard.state import DashboardState
from lopt.errors import LoptError
from lopt.runs import (
    COMPLETIONS,
    METRICS,
    MODEL_CONFIG,
    TRAINING_ARGS,
    checkpoints,
    read_json_if_complete,
    recipe_of,
)
from lopt.training.callbacks import RunInfo
from lopt.training.metrics import EVAL_FIELDS, FIELDS, LATER_FIELDS, StepMetrics

# The fields a row must hold as numbers to be drawn (training/metrics.py; epoch and grad_norm may be null).
NUMBER_FIELDS = ("task_loss", "lr", "lr_k1", "tokens_per_s", "peak_mem_bytes", "activation_peak_bytes", "elapsed_s")


def step_metrics(row: dict) -> StepMetrics | None:
    """A metrics.jsonl row as the StepMetrics it was written from; None for a row that breaks the
    contract (a missing field, a step that is not an integer, a number that is not one)."""
    required = [name for name in FIELDS if name not in LATER_FIELDS]  # LATER_FIELDS: absent from older files
    if not all(name in row for name in required) or not isinstance(row["step"], int):
        return None
    if not isinstance(row["aux_loss"], list) or not all(isinstance(row[name], int | float) for name in NUMBER_FIELDS):
        return None
    recipe = {name: value for name, value in row.items() if name not in FIELDS and name not in EVAL_FIELDS}
    validation = {name: row.get(name) for name in EVAL_FIELDS}  # absent from files older than validation
    return StepMetrics(**{name: row.get(name) for name in FIELDS}, **validation, recipe=recipe)


def layer_count(folder: Path, args: dict) -> int | None:
    """The model's decoder layers, from a config.json the run left (final model, newest checkpoint) or
    the starting model's, when it is a local folder."""
    newest_first = checkpoints(folder, complete_only=False)[::-1]
    start = args.get("model_name_or_path")
    candidates = [folder, *newest_first] + ([Path(start)] if start else [])
    for path in (candidate / MODEL_CONFIG for candidate in candidates):
        config = read_json_if_complete(path) or {}
        layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
        if isinstance(layers, int) and layers > 0:
            return layers
    return None


class RunFolder:
    """One run folder followed incrementally; `poll()` reads what is new into `state`."""

    def __init__(self, path: Path, hardware: HardwareSampler | None = None):
        self.path = Path(path)
        self.hardware = hardware
        self.state = DashboardState()
        self.metrics = JsonlFollower(self.path / METRICS)
        self.completions = JsonlFollower(self.path / COMPLETIONS)
        self._args_mtime: float | None = None
        self._first_row: dict | None = None
        self._checkpoints: set[str] = set()
        self._broken_rows = 0  # metrics.jsonl rows that break the contract (step_metrics)
        self._unreadable_reported = 0

    def poll(self) -> DashboardState:
        state = self.state
        self._read_args()
        rows = self.metrics.read_new()
        self._first_row = self._first_row or (rows[0] if rows else None)
        if state.args is not None or self._first_row is not None:
            self._describe_run()
        for row in rows:
            metrics = step_metrics(row)
            if metrics is None:
                self._broken_rows += 1
            else:
                state.record_metrics(metrics)
        for row in self.completions.read_new():
            state.record_completion(row)
        self._note_unreadable()
        self._note_checkpoints()
        metrics_written = _mtime(self.path / METRICS)
        final_model = _mtime(self.path / MODEL_CONFIG)  # save_final_model writes config.json last
        state.last_row_time = metrics_written
        # a config.json older than the metrics is an earlier run's, overwritten by this one
        state.finished = final_model is not None and (metrics_written is None or final_model >= metrics_written)
        if self.hardware is not None:
            state.record_hardware(self.hardware.sample())
        return state

    def _read_args(self) -> None:
        mtime = _mtime(self.path / TRAINING_ARGS)
        if mtime is not None and mtime != self._args_mtime:
            args = read_json_if_complete(self.path / TRAINING_ARGS)
            if args is not None:  # None: being written, read it next time
                self.state.args, self._args_mtime = args, mtime

    def _describe_run(self) -> None:
        """The RunInfo the live dashboard would have been told, from the files (what they do not record,
        the processes and the backend, is left out: world_size 0)."""
        state, args, row = self.state, self.state.args or {}, self._first_row
        method = args.get("method")
        if method is None:
            method = "lopt" if row is not None and row.get("aux_loss") else "e2e"
        lopt = method in ("lopt", "ll")
        blocks = state.run.blocks if state.run is not None else []
        if not blocks:
            layers, k = layer_count(self.path, args), int(args.get("num_blocks", 2)) if lopt else 1
            if layers is not None and 1 <= k <= layers:
                from lopt.models.local_learning import split_blocks  # imports torch: only once layers are known

                blocks = split_blocks(layers, k)
        state.run = RunInfo(
            recipe=recipe_of(args, row),
            method="lopt" if lopt else "e2e",
            blocks=blocks,
            backward=args.get("backward", "local"),
            total_steps=max(int(args.get("max_steps") or 0), 0),
            start_step=0,
            output_dir=self.path,
            world_size=0,
            backend="",
        )

    def _note_unreadable(self) -> None:
        unreadable = self.metrics.unreadable_lines + self.completions.unreadable_lines + self._broken_rows
        if unreadable > self._unreadable_reported:
            self._unreadable_reported = unreadable
            self.state.record_event(
                "WARNING", f"{unreadable} lines of the run's .jsonl files are not readable rows; skipped"
            )

    def _note_checkpoints(self) -> None:
        for path in checkpoints(self.path):
            if path.name not in self._checkpoints:
                self._checkpoints.add(path.name)
                self.state.record_checkpoint(path)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def view(folders: list[RunFolder]) -> RenderableType:
    """One frame: the dashboard of a single run, or several side by side."""
    states = [folder.poll() for folder in folders]
    if len(folders) == 1:
        return DashboardView(states[0])
    names = [folder.path.name or str(folder.path) for folder in folders]
    if len(set(names)) < len(names):  # same-named runs in different places: their paths tell them apart
        names = [str(folder.path) for folder in folders]
    return ComparisonView(list(zip(names, states, strict=True)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lopt watch", description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders (their --output_dir); several are shown side by side"
    )
    parser.add_argument(
        "--once", action="store_true", help="print one frame to stdout and exit (finished runs, scripts)"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads of the files (default: 1)")
    args = parser.parse_args(argv)
    if not args.interval > 0:
        raise LoptError(f"--interval {args.interval}: must be a positive number of seconds; for example --interval 1.")
    for run in args.runs:
        if not Path(run).is_dir():
            what = "is a file" if Path(run).exists() else "does not exist"
            raise LoptError(
                f"RUN_DIR {run} {what}; pass a run's --output_dir (a folder the run has not written into yet is fine: "
                "its files are followed as they appear)."
            )
    hardware = HardwareSampler(process=False) if len(args.runs) == 1 else None
    folders = [RunFolder(Path(run), hardware) for run in args.runs]
    console = Console()
    if args.once:
        console.print(view(folders))
        return
    if not console.is_terminal:
        raise LoptError(
            "the output is not a terminal, so there is no screen to follow the runs on; pass --once to print one frame."
        )
    try:
        with Live(
            console=console, screen=True, auto_refresh=False, redirect_stdout=False, redirect_stderr=False
        ) as live:
            while True:
                live.update(view(folders), refresh=True)
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one stops watching; leaving the Live block has restored the terminal


if __name__ == "__main__":
    try:
        main()
    except LoptError as error:
        print(f"lopt watch: error: {error}", file=sys.stderr)
        sys.exit(2)
