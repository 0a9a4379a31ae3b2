"""`validate`: the checks of a config that need only its flags (no model, no data, no user code, no process count);
each error names the flag and the fix. Each feature's own checks live beside its flags and are called from here."""

from __future__ import annotations

from lopt.config.adapters import validate_adapters
from lopt.config.fields import flag_fields
from lopt.config.method import METHODS, validate_block_step, validate_clip_per_block, validate_method
from lopt.config.report_to import parse_report_to
from lopt.config.validation import validate_validation
from lopt.errors import LoptError, unknown_choice


def validate(config) -> None:
    """Checks that need no model or data; each error names the flag and the fix."""
    if config.method not in METHODS:
        raise unknown_choice("--method", config.method, sorted(METHODS))
    for f in flag_fields(type(config)):  # argparse checks flags; this checks YAML values too (--optim among them)
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise unknown_choice(f"--{f.name}", getattr(config, f.name), choices)
    from transformers import SchedulerType  # here: importing transformers takes seconds, --help needs none of it

    schedules = [kind.value for kind in SchedulerType]
    if config.lr_scheduler_type not in schedules:
        raise unknown_choice("--lr_scheduler_type", config.lr_scheduler_type, schedules)
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise LoptError(
            f"--num_train_epochs {config.num_train_epochs} trains nothing; pass a number above 0, or --max_steps N."
        )
    validate_method(config)
    if config.bf16 and config.fp16:
        raise LoptError("--bf16 and --fp16 are exclusive; pass one (bf16 where the GPU supports it).")
    for name in config.AT_LEAST_ONE:
        if getattr(config, name) < 1:
            raise LoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.learning_rate <= 0 or (config.lr_k1 is not None and config.lr_k1 < 0):
        raise LoptError("--learning_rate must be > 0 and --lr_k1 >= 0.")
    if config.save_total_limit is not None and config.save_total_limit < 1:
        raise LoptError(f"--save_total_limit must be at least 1, got {config.save_total_limit}.")
    if config.max_samples is not None and config.max_samples < 1:
        raise LoptError(f"--max_samples must be at least 1, got {config.max_samples}.")
    validate_adapters(config)
    validate_validation(config)
    if getattr(config, "block_step", False):
        validate_block_step(config)
    if getattr(config, "clip_per_block", False):
        validate_clip_per_block(config)
    if getattr(config, "kl_beta", 0.0) < 0:
        raise LoptError(f"--kl_beta must be >= 0 (0 turns the KL term off), got {config.kl_beta}.")
    if getattr(config, "kl_beta", 0.0) > 0 and config.liger:
        raise LoptError("--kl_beta computes the LM head chunk by chunk itself; drop --liger to use it.")
    config.check_own_flags()
    parse_report_to(config.report_to)  # named and installed, before anything loads
    if not config.output_dir:
        raise LoptError("--output_dir is required: the folder where the run writes its model, metrics and checkpoints.")
