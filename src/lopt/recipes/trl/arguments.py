"""lopt's flags as a TRL trainer's config, and its validation settings."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from lopt.config import RunConfig, eval_steps, validates
from lopt.config.report_to import parse_report_to
from lopt.errors import LoptError
from lopt.training.trackers import (
    tracker_names,
)

logger = logging.getLogger(__name__)


def trl_arguments(trl_config_cls, config: RunConfig, **specific):
    """TRL's config for a run: lopt's shared flags plus the recipe's `specific` ones.

    Settings the installed TRL does not have are left out and reported once, by name. Values TRL
    rejects become a LoptError that quotes TRL's reason.
    """
    known = {f.name for f in dataclasses.fields(trl_config_cls)}
    # Settings renamed in transformers 5 (the old names warn, or are gone): use whichever TRL has.
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    # transformers 5 reads a warmup_steps below 1 as a ratio of the training steps.
    warmup = "warmup_ratio" if "warmup_ratio" in known else "warmup_steps"
    # --report_to: transformers' own integrations (training/trackers.py), under lopt's project and run names
    report_to = parse_report_to(getattr(config, "report_to", "none"))
    project, run_name = tracker_names(config.output_dir)
    tracking = {name: value for name, value in dict(project=project, run_name=run_name).items() if name in known}
    requested = dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        optim=config.optim,  # transformers' names: lopt builds the optimizer itself (create_optimizer)
        **{warmup: config.warmup_ratio},
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else 0.0,
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(config.save_steps, 1),
        # no save_total_limit: TRL would delete older checkpoints before the newest is complete (see
        # LoptTrainerMixin._save_checkpoint, which prunes after it)
        trust_remote_code=config.trust_remote_code,
        # --bf16 loads the weights in bfloat16 (see sft.weights_dtype), so TRL needs no bf16 autocast;
        # --fp16 is autocast with loss scaling, which TRL's accelerator provides.
        bf16=False,
        fp16=config.fp16,
        report_to=report_to or "none",
        **(tracking if report_to else {}),
        # accelerate runs CPU processes (torchrun without CUDA) as one data-parallel job only when told to
        # use the CPU; otherwise each process would train alone on all the data.
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        # LoPT checkpoints each layer itself (LocalLearningLM.enable_gradient_checkpointing, from
        # --gradient_checkpointing) so that a recomputation never re-runs a block boundary; TRL's own
        # checkpointing (on by default) would wrap the boundary hooks.
        **{checkpointing: False},
        **specific,
    )
    unknown = sorted(set(requested) - known)
    if unknown:
        import trl

        logger.warning(
            "the installed TRL %s has no setting for %s; %s not passed to TRL. Upgrade TRL to use %s.",
            trl.__version__,
            ", ".join(f"--{name}" for name in unknown),
            "it is" if len(unknown) == 1 else "they are",
            "it" if len(unknown) == 1 else "them",
        )
    try:
        return trl_config_cls(**{k: v for k, v in requested.items() if k in known})
    except ValueError as error:
        raise LoptError(f"TRL rejected these settings: {error}") from error


def trl_metric(column: str, columns: dict[str, str]) -> str:
    """The key of TRL's validation logs a validation column of metrics.jsonl comes from: eval_task_loss is the
    Trainer's eval_loss, a recipe's validation column its column's key with TRL's eval_ prefix."""
    return "eval_loss" if column == "eval_task_loss" else "eval_" + columns[column.removeprefix("eval_")]


def validation_arguments(config: RunConfig, columns: dict[str, str]) -> dict:
    """TRL's (transformers') validation settings from lopt's --eval_* flags, for `trl_arguments`; `columns` are the
    recipe's metrics.jsonl columns and their TRL keys. Nothing without validation records (TRL's "no")."""
    if not validates(config):
        return {}
    return dict(
        eval_strategy="steps",
        eval_steps=eval_steps(config),
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        load_best_model_at_end=config.load_best_model_at_end,
        metric_for_best_model=trl_metric(config.metric_for_best_model, columns),
        greater_is_better=config.BEST_MODEL_METRICS[config.metric_for_best_model],
    )
