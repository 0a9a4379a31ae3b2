"""The validation flags (held-out records: at most one of --eval_file, --eval_split, --eval_ratio; how often to
validate, the best model, early stopping) and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from lopt.config.fields import option
from lopt.errors import LoptError, unknown_choice

EVAL_SOURCES = ("eval_file", "eval_split", "eval_ratio")
EVAL_OPTIONS = (
    "eval_steps",
    "per_device_eval_batch_size",
    "load_best_model_at_end",
    "metric_for_best_model",
    "early_stopping_patience",
)


@dataclass
class ValidationFlags:
    eval_file: str | None = option(
        None, "validate on the records of this file or saved dataset folder (the formats of --train_file)"
    )
    eval_split: str | None = option(
        None, "validate on this split (validation, test, ...) of the training data's hub dataset or saved DatasetDict"
    )
    eval_ratio: float | None = option(
        None, "validate on this fraction of the training records, held out before training (drawn with --seed)"
    )
    eval_steps: int | None = option(None, "validate every N steps and after the last one (default: --logging_steps)")
    per_device_eval_batch_size: int = option(8, "validation batch size per process")
    load_best_model_at_end: bool = option(
        False, "save the weights of the best validation as the final model, not the last ones (--metric_for_best_model)"
    )
    metric_for_best_model: str = option(
        "eval_task_loss", "validation metric that decides the best model: eval_task_loss (lower is better)"
    )
    early_stopping_patience: int | None = option(
        None, "stop when --metric_for_best_model has not improved for N validations in a row"
    )


def validates(config) -> bool:
    """Whether the run has validation records (--eval_file, --eval_split or --eval_ratio)."""
    return any(getattr(config, name) is not None for name in EVAL_SOURCES)


def eval_steps(config) -> int:
    """Steps between validations: --eval_steps, else --logging_steps (as transformers' TrainingArguments)."""
    return config.eval_steps if config.eval_steps is not None else config.logging_steps


def validate_validation(config) -> None:
    sources = [f"--{name}" for name in EVAL_SOURCES if getattr(config, name) is not None]
    if len(sources) > 1:
        raise LoptError(
            f"{' and '.join(sources)} each name the validation records; pass only one of --eval_file, --eval_split "
            "and --eval_ratio."
        )
    if not sources:
        given = [f"--{name}" for name in EVAL_OPTIONS if name in config.explicit and getattr(config, name)]
        if given:
            raise LoptError(
                f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} validation records; add --eval_file "
                "FILE, --eval_split NAME or --eval_ratio R (a held-out fraction of the training records), or drop "
                f"{'it' if len(given) == 1 else 'them'}."
            )
        return
    if config.eval_ratio is not None and not 0 < config.eval_ratio < 1:
        raise LoptError(
            f"--eval_ratio is the fraction of the training records held out for validation: pass a number between 0 "
            f"and 1 (e.g. 0.05), got {config.eval_ratio}."
        )
    for name in ("eval_steps", "early_stopping_patience"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise LoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    metrics = config.BEST_MODEL_METRICS
    if config.metric_for_best_model not in metrics:
        raise unknown_choice(
            "--metric_for_best_model",
            config.metric_for_best_model,
            {name: "higher is better" if greater else "lower is better" for name, greater in metrics.items()},
        )
    if config.load_best_model_at_end and config.BEST_FROM_CHECKPOINTS:
        # TRL's Trainer (transformers) restores the best of the checkpoints it saved at validation steps only.
        every = eval_steps(config)
        if config.save_steps == 0 or config.save_steps % every:
            raise LoptError(
                f"--load_best_model_at_end restores the best checkpoint, so checkpoints must be saved at validation "
                f"steps: --save_steps {config.save_steps} is not a multiple of --eval_steps {every}. Pass --save_steps "
                f"{max(config.save_steps // every, 1) * every}, or an --eval_steps that divides --save_steps."
            )
