"""The run folder as data: the files a run leaves in its --output_dir, their names, and reading them.

Everything a run produces lives in its folder: the final model (a plain Hugging Face checkpoint or a peft
adapter folder), `training_args.json` (the flags, the recipe that made the run and lopt's version),
`metrics.jsonl` (one row per logged step, training/metrics.py's contract), `eval.json` (`lopt eval`),
`completions.jsonl` (GRPO/RLOO's sampled completions) and `checkpoint-N/` folders. Reports, the dashboard's
`watch`, the study and publishing read runs only through this module, so they work on runs made on another
machine. It imports no torch: reading a run folder takes milliseconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lopt import __version__
from lopt.errors import LoptError

TRAINING_ARGS = "training_args.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
COMPLETIONS = "completions.jsonl"
MODEL_CONFIG = "config.json"  # the final model's (or a checkpoint's): save_final_model writes it last
CHECKPOINT_PREFIX = "checkpoint-"
# A checkpoint is complete once this file is in it: training/checkpoint.py writes it last.
TRAINING_STATE = "training_state.pt"
# The files that make a folder a run's (a starting model evaluated by the demo has only eval.json).
RUN_FILES = (TRAINING_ARGS, METRICS, EVAL)

# --method's values as training_args.json records them ('ll' is the LoPT reference implementation's name).
METHODS = {"e2e": "e2e", "lopt": "lopt", "ll": "lopt"}

# Folders written before training_args.json named its recipe (lopt 0.1.0) are told by the columns only its recipe's
# metrics.jsonl rows had, else (no row yet) by a flag only its config had, checked in order (RLOO's flags are GRPO's
# and more, and GRPO's overlap DPO's); RLOO and GRPO log the same columns, so RLOO's own flag tells them apart.
# Frozen history: a new recipe records its name and never needs an entry here.
LEGACY_RECIPE_COLUMNS = (("grpo", "reward_std"), ("dpo", "reward_chosen"), ("rm", "reward_mean"))
LEGACY_RECIPE_FLAGS = (
    ("rloo", "normalize_advantages"),
    ("grpo", "num_generations"),
    ("rm", "center_rewards_coefficient"),
    ("dpo", "loss_type"),
)


@dataclass
class Run:
    """A run folder's files, read: the flags, the logged steps and the evaluation."""

    name: str
    args: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
    trained_parameters: int | None = None  # the adapter's (LoRA), or the saved model's (full training)

    @property
    def recipe(self) -> str | None:
        """The recipe that made the run (sft, grpo, ...); None for a folder without training_args.json (a
        starting model)."""
        return recipe_of(self.args, self.metrics[0] if self.metrics else None) if self.args else None

    @property
    def method(self) -> str:
        """The method as reports label it: e2e, lopt or lopt-frozen, with +lora and +kl where they apply; base for a
        folder that holds no training (a starting model)."""
        if not self.args:
            return "base"
        method = METHODS.get(self.args.get("method", ""), self.args.get("method", "?"))
        method = "lopt-frozen" if method == "lopt" and self.args.get("early_blocks") == "frozen" else method
        return method + ("+lora" if self.args.get("use_peft") else "") + ("+kl" if self.args.get("kl_beta") else "")

    @property
    def blocks(self) -> int | None:
        if not self.args:
            return None
        return 1 if self.method.startswith("e2e") else self.args.get("num_blocks")

    def last(self, key: str):
        values = self.series(key)
        return values[-1][1] if values else None

    def series(self, key: str) -> list[tuple[int, object]]:
        """Every logged (step, value) of `key`, by step. A resumed run logs again the steps after its checkpoint:
        the later row of a step is the one the continued run kept."""
        rows = {m["step"]: m for m in self.metrics}
        return [(step, row[key]) for step, row in sorted(rows.items()) if row.get(key) is not None]

    def mean(self, key: str) -> float | None:
        values = [v for _, v in self.series(key)]
        return sum(values) / len(values) if values else None

    def peak(self, key: str) -> float | None:
        values = [v for _, v in self.series(key)]
        return max(values) if values else None


def recipe_of(args: dict, row: dict | None) -> str:
    """The recipe named by a run's training_args.json, or for a folder older than that field, the one its first
    metrics.jsonl row or its flags tell (LEGACY_RECIPE_COLUMNS, LEGACY_RECIPE_FLAGS); sft when nothing tells."""
    if args.get("recipe"):
        return args["recipe"]
    if row is not None:
        recipe = next((recipe for recipe, column in LEGACY_RECIPE_COLUMNS if column in row), "sft")
        return "rloo" if recipe == "grpo" and "normalize_advantages" in args else recipe
    return next((recipe for recipe, flag in LEGACY_RECIPE_FLAGS if flag in args), "sft")


def is_run_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in RUN_FILES)


def load_run(folder: Path) -> Run:
    """The run in `folder` (its --output_dir), read; an error that says what is wrong when it holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoptError(f"RUN_DIR {folder}: no such folder; pass the --output_dir of a run.")
    if not is_run_folder(folder):
        raise LoptError(f"RUN_DIR {folder}: has none of {', '.join(RUN_FILES)}; pass the --output_dir of a run.")
    run = Run(name=folder.name)
    if (folder / TRAINING_ARGS).is_file():
        run.args = read_json(folder / TRAINING_ARGS)
    if (folder / METRICS).is_file():
        lines = (folder / METRICS).read_text().splitlines()
        try:
            run.metrics = [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as error:
            raise LoptError(f"{folder / METRICS}: a line is not valid JSON ({error}).") from None
    if (folder / EVAL).is_file():
        run.evaluation = read_json(folder / EVAL)
    if run.args and not run.method.startswith("lopt-frozen"):  # the frozen ablation trains part of what it saves
        run.trained_parameters = saved_parameters(folder) or None
    return run


def read_json(path: Path) -> dict:
    """The JSON in a run's file; an error naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise LoptError(
            f"{path}: not valid JSON ({error}); re-create it by re-running the run or `lopt eval`."
        ) from None


def read_json_if_complete(path: Path) -> dict | None:
    """The JSON object in `path`, or None while it is missing or not complete (a run is writing it)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # missing, unreadable, or half written
        return None
    return value if isinstance(value, dict) else None


def write_training_args(folder: Path, recipe: str, flags: dict) -> None:
    """training_args.json: the recipe that made the run and lopt's version, then the run's flags."""
    record = {"recipe": recipe, "lopt_version": __version__, **flags}
    (Path(folder) / TRAINING_ARGS).write_text(json.dumps(record, indent=2) + "\n")


def flags_of(args: dict) -> dict:
    """A training_args.json's flags alone (without what the run folder adds: the recipe, lopt's version)."""
    return {name: value for name, value in args.items() if name not in ("recipe", "lopt_version")}


def checkpoint_step(path: Path) -> int | None:
    """N for checkpoint-N (the temporary folders a checkpoint is built in have other names)."""
    suffix = Path(path).name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if Path(path).name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoints(folder: Path, complete_only: bool = True) -> list[Path]:
    """The run's checkpoint-N folders, oldest first; only those whose training state was written last, unless
    `complete_only` is off."""
    found = [p for p in Path(folder).glob(CHECKPOINT_PREFIX + "*") if checkpoint_step(p) is not None]
    found = [p for p in found if not complete_only or (p / TRAINING_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def saved_parameters(folder: Path) -> int:
    """Parameters stored in a folder's safetensors files (the adapter's, in an adapter folder), read from
    the files' headers without loading a tensor."""
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with file.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total
