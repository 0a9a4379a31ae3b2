"""`--report_to`: the experiment trackers a TRL user already has (Trackio, TensorBoard, Weights & Biases),
through their own libraries (`pip install 'lopt[tracking]'`).

`--report_to none` (the default) or a comma-separated list of `trackio`, `tensorboard`, `wandb`. Each
tracker gets every field of the metrics contract (training/metrics.py) at each logged step, and lopt's
run config (`config.to_json()`) as the run's config. Two entry points:

- `tracker_callbacks(report_to, config)`: the SFT loop's listeners, one `Callback` per tracker.
- `trl_arguments` (recipes/trl/arguments.py) passes the names to TRL as its `report_to`, so GRPO and DPO log
  through transformers' own integrations (every metric TRL logs, completion tables included). lopt's
  trainer mixin adds the contract's fields TRL does not log to TRL's logs, and `trl_reporting` there
  (around `trainer.train()`) starts wandb where lopt keeps it and adds lopt's config to each tracker's.

Where each writes, for `--output_dir outputs/sft-lopt` (project `outputs`: the folder holding the run,
so sibling runs are compared in one project; run `sft-lopt-<YYYYmmdd-HHMMSS>`, one tracker run per launch):

- tensorboard: event files in `<output_dir>/runs/<Mon>DD_HH-MM-SS_<host>/` (the folder transformers'
  Trainer uses); view with `tensorboard --logdir <output_dir>/runs`.
- trackio: project `outputs` in Trackio's local database, `$TRACKIO_DIR/outputs.db` (default
  `~/.cache/huggingface/trackio`, Trackio's own place, where `trackio show --project outputs` finds it).
  lopt starts no server, Space or browser; only Trackio's own TRACKIO_SPACE_ID / TRACKIO_SERVER_URL,
  when the user sets them, send the metrics elsewhere.
- wandb: `<output_dir>/wandb/offline-run-*/` (`$WANDB_DIR/wandb/` when set), offline unless WANDB_MODE
  says otherwise (`wandb sync <folder>` uploads later); project `$WANDB_PROJECT` or `outputs`.

Metric names are the same in every recipe: `train/<name>` where `<name>` is the Trainer's own for what
it logs itself (`epoch`, `grad_norm`), `lopt/aux_loss_block_<i>` for block i's local loss,
`lopt/grad_norm_block_<i>` for block i's gradient norm (where the recipe reports it) and
`lopt/<field>` for every other contract field (`lopt/task_loss`, `lopt/lr`, `lopt/lr_k1`,
`lopt/tokens_per_s`, `lopt/peak_mem_bytes`, `lopt/activation_peak_bytes`, `lopt/elapsed_s`); the x axis
is the optimizer step (`train/global_step` in Trackio and wandb). GRPO and DPO add every metric TRL logs
under TRL's names (`train/loss`, `train/rewards/accuracies`, ...). Validation (--eval_*) goes under `eval/`:
`eval/lopt/task_loss` and `eval/lopt/aux_loss_block_<i>` in every recipe, and TRL's own (`eval/loss`,
`eval/rewards/accuracies`, ...) for GRPO and DPO.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lopt.config.report_to import INSTALL, TRACKER_MODULES, parse_report_to
from lopt.errors import LoptError
from lopt.training.callbacks import Callback, RunInfo
from lopt.training.metrics import EVAL_FIELDS, FIELDS, StepMetrics

if TYPE_CHECKING:
    from lopt.config import RunConfig

# Contract fields the Trainer logs itself, under these names; lopt keeps them (GRPO/DPO log them as TRL does).
TRAINER_NAMES = ("epoch", "grad_norm")
AUX_LOSS_KEY = "lopt/aux_loss_block_{}"  # block i's local loss (1-based)
BLOCK_GRAD_NORM_KEY = "lopt/grad_norm_block_{}"  # block i's gradient norm before clipping (1-based)
# The list fields, one scalar per block each.
PER_BLOCK = {"aux_loss": AUX_LOSS_KEY, "block_grad_norm": BLOCK_GRAD_NORM_KEY}
CONFIG_TEXT = "lopt_config"  # TensorBoard's text tag for the run's config


def lopt_key(field: str) -> str:
    """The name of a contract field in TRL's logs and in the trackers (without the `train/` prefix)."""
    return f"lopt/{field}"


def tracker_names(output_dir: str | os.PathLike) -> tuple[str, str]:
    """(project, run name) of a run in Trackio and wandb: the folder holding `output_dir`, and `output_dir`'s
    own name with the launch time (each launch, a resumed one too, is one tracker run)."""
    out = Path(output_dir).resolve()
    project = _safe_name(out.parent.name) or "lopt"
    return project, f"{_safe_name(out.name) or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _safe_name(name: str) -> str:
    # Trackio keeps [A-Za-z0-9_-] of a project's name for its database file; keep the names equal to it.
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def tracker_scalars(metrics: StepMetrics) -> dict[str, float]:
    """A logged step as the trackers show it (the module docstring lists the names); None values are left out."""
    scalars: dict[str, Any] = {}
    for column, value in metrics.to_json().items():
        # a validation field is its training field's name under eval/, as transformers names validation logs
        section, name = ("eval", column.removeprefix("eval_")) if column in EVAL_FIELDS else ("train", column)
        if name == "step":
            continue  # the x axis
        if name in PER_BLOCK:
            scalars.update({f"{section}/{PER_BLOCK[name].format(i + 1)}": v for i, v in enumerate(value or [])})
        elif name in TRAINER_NAMES or name not in FIELDS:  # the Trainer's own names; a recipe's columns
            scalars[f"{section}/{name}"] = value
        else:
            scalars[f"{section}/{lopt_key(name)}"] = value
    return {name: value for name, value in scalars.items() if value is not None}


def import_tracker(name: str, module: str | None = None):
    """The library of tracker `name` (or its `module`), imported now; a broken install raises LoptError."""
    module = module or TRACKER_MODULES[name]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise LoptError(
            f"--report_to {name}: importing {module} failed ({error}). Reinstall with: {INSTALL}"
        ) from error


def config_text(values: dict) -> str:
    return f"```json\n{json.dumps(values, indent=2, default=str)}\n```"  # TensorBoard renders text as markdown


class TensorBoardTracker(Callback):
    """Event files in `<output_dir>/runs/<time>_<host>/`: each contract field a scalar, the config a text."""

    def __init__(self, config: RunConfig):
        self.values = config.to_json()
        self.summary_writer = import_tracker("tensorboard", "torch.utils.tensorboard").SummaryWriter
        self.writer = None
        self.log_dir: Path | None = None

    def on_train_begin(self, run: RunInfo) -> None:
        # the folder name transformers' TensorBoardCallback gives a run (so GRPO/DPO runs sit alike)
        self.log_dir = run.output_dir / "runs" / f"{time.strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"
        self.writer = self.summary_writer(log_dir=str(self.log_dir))
        self.writer.add_text(CONFIG_TEXT, config_text(self.values), run.start_step)

    def on_log(self, metrics: StepMetrics) -> None:
        for name, value in tracker_scalars(metrics).items():
            self.writer.add_scalar(name, value, metrics.step)
        self.writer.flush()

    def on_train_end(self, step: int) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TrackioTracker(Callback):
    """A run in Trackio's local database (project and run from `tracker_names`), with the config."""

    def __init__(self, config: RunConfig, project: str, name: str):
        self.values, self.project, self.name = config.to_json(), project, name
        self.trackio = import_tracker("trackio")
        self.run = None

    def on_train_begin(self, run: RunInfo) -> None:
        # embed=False: never a dashboard, even in a notebook; a new run per launch ("never" resumes by name)
        self.run = self.trackio.init(
            project=self.project, name=self.name, config=self.values, resume="never", embed=False
        )

    def on_log(self, metrics: StepMetrics) -> None:
        # Trackio's own step is the optimizer step here (GRPO/DPO: transformers counts logging calls)
        self.run.log({**tracker_scalars(metrics), "train/global_step": metrics.step}, step=metrics.step)

    def on_train_end(self, step: int) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class WandbTracker(Callback):
    """A Weights & Biases run in `<output_dir>/wandb/`, offline unless WANDB_MODE says otherwise."""

    def __init__(self, config: RunConfig, project: str, name: str):
        self.values, self.project, self.name = config.to_json(), project, name
        self.wandb = import_tracker("wandb")
        self.run = None

    def on_train_begin(self, run: RunInfo) -> None:
        self.run = start_wandb(self.wandb, run.output_dir, self.project, self.name, self.values)
        # the x axis of every metric, as transformers' WandbCallback sets it for GRPO/DPO
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def on_log(self, metrics: StepMetrics) -> None:
        self.run.log({**tracker_scalars(metrics), "train/global_step": metrics.step})

    def on_train_end(self, step: int) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def start_wandb(wandb, output_dir: Path, project: str, name: str, values: dict | None = None):
    """A wandb run in `<output_dir>/wandb/` (or $WANDB_DIR), offline unless the user set WANDB_MODE."""
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT") or project,
        name=name,
        dir=os.environ.get("WANDB_DIR") or str(output_dir),
        mode=os.environ.get("WANDB_MODE") or "offline",
        config=values,
    )


def tracker_callbacks(report_to: str | None, config: RunConfig) -> list[Callback]:
    """The SFT loop's listeners for `--report_to` (none: []); unknown or missing trackers raise LoptError."""
    names = parse_report_to(report_to)
    project, name = tracker_names(config.output_dir)
    make = {
        "tensorboard": lambda: TensorBoardTracker(config),
        "trackio": lambda: TrackioTracker(config, project, name),
        "wandb": lambda: WandbTracker(config, project, name),
    }
    return [make[tracker]() for tracker in names]
