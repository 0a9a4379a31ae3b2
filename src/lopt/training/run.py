"""Run set-up that every recipe shares: the output folder, the weights' dtype, the wrapped model, SFT's task loss.

A recipe (recipes/) calls these; nothing here knows which recipe runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lopt.config import RunConfig, SFTConfig
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.models.lora import add_lora, load_adapter, quantization_config, trainable_parameters
from lopt.models.registry import load_model_and_tokenizer
from lopt.output import console, plural
from lopt.training.checkpoint import TRAINING_STATE, has_final_model, latest_checkpoint, leftover_temp_folders
from lopt.training.optim import optimizer_class
from lopt.training.task_loss import AdaptersDisabled, CausalLMLoss, FrozenStartingModel, KLRegularizedLoss, TaskLoss


def prepare_output_dir(config: RunConfig) -> Path:
    """Refuse to mix this run's files with an earlier run's unless the user said so, saying what is there
    and what to run instead; remove the folders a stopped save left half-built (`.tmp-*`)."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise LoptError(f"--output_dir {out} exists and is a file; pass a folder path.")
    leftovers = leftover_temp_folders(out) if out.is_dir() else []
    contents = sorted(set(out.iterdir()) - set(leftovers)) if out.is_dir() else []
    if contents and not (config.overwrite_output_dir or config.resume_from_checkpoint is not None):
        raise LoptError(_not_empty(out, contents))
    for folder in leftovers:
        shutil.rmtree(folder)
    if leftovers:
        names = ", ".join(f"{folder.name}/" for folder in leftovers)
        console.print(f"removed {names} from {out}: left half-built by a save that was stopped", highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _not_empty(out: Path, contents: list[Path]) -> str:
    """What a non-empty --output_dir holds (a finished run, an interrupted one, other files) and the commands
    that fit it."""
    shown = ", ".join(f"{p.name}/" if p.is_dir() else p.name for p in contents[:6])
    listing = shown + (f" and {len(contents) - 6} more" if len(contents) > 6 else "")
    elsewhere = "pass a new --output_dir"
    overwrite = "add --overwrite_output_dir to write into this one (files with the same names are replaced)"
    checkpoint = latest_checkpoint(out)
    if has_final_model(out):
        return (
            f"--output_dir {out} holds a finished run: its final model is there ({listing}). To train again, "
            f"{elsewhere}, or {overwrite}. To train that model further, pass --model_name_or_path {out} "
            "with a new --output_dir."
        )
    if checkpoint is not None:
        return (
            f"--output_dir {out} holds an interrupted run ({listing}) whose newest complete checkpoint is "
            f"{checkpoint.name}/. Add --resume_from_checkpoint latest to continue it from {checkpoint}; to start "
            f"again instead, {elsewhere}, or {overwrite}."
        )
    if (out / "training_args.json").is_file():
        return (
            f"--output_dir {out} holds an interrupted run ({listing}) that saved no complete checkpoint "
            f"(a checkpoint-N/ with {TRAINING_STATE}), so there is nothing to resume. To start again, {elsewhere}, "
            f"or {overwrite}."
        )
    return (
        f"--output_dir {out} is not empty and holds no lopt run ({listing}). {elsewhere.capitalize()}, or {overwrite}."
    )


def weights_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    if config.fp16 and device.type != "cuda":
        raise LoptError("--fp16 needs a CUDA GPU (none found). Drop --fp16 to train in float32 on this machine.")
    bf16 = config.bf16
    if bf16 is None:  # auto: bf16 where the hardware has it
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def build_model(config: RunConfig, device: torch.device, weights: str | None = None, reward_model: bool = False):
    """The wrapped model and its tokenizer; `weights` (a checkpoint folder) replaces the starting weights on resume.
    `reward_model`: the model with a one-score head instead of the LM head (`lopt rm`)."""
    dtype = weights_dtype(config, device)
    optimizer_class(config.optim, device.type)  # an --optim that cannot run here fails before the load's wait
    quantization = quantization_config(config.load_in_4bit, config.load_in_8bit, device, dtype)
    model, tokenizer = load_model_and_tokenizer(
        config.model_name_or_path if config.use_peft else weights or config.model_name_or_path,
        dtype=dtype,
        trust_remote_code=config.trust_remote_code,
        quantization=quantization,
        reward_model=reward_model,
    )
    return wrap_model(model, config, device, weights, quantized=quantization is not None), tokenizer


def wrap_model(
    model, config: RunConfig, device: torch.device, weights: str | None = None, quantized: bool = False
) -> LocalLearningLM:
    """The loaded `model` made what `config` trains: in its blocks with LoPT's settings (one block for E2E), on
    `device`, gradient checkpointing as asked, in train mode.

    With --use_peft the base model is frozen and LoRA adapters are added (models/lora.py) before the
    blocks are wrapped; on resume the checkpoint `weights` hold the adapters, which go onto the starting model.
    A `quantized` model stays where bitsandbytes placed it.
    """
    if config.use_peft:
        if quantized:
            from peft import prepare_model_for_kbit_training

            # lopt checkpoints layers itself (enable_gradient_checkpointing below), so peft must not.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = load_adapter(model, weights, trainable=True) if weights else add_lora(model, config)
    wrapped = LocalLearningLM.from_settings(model, config.lopt)
    if not quantized:  # quantized weights were placed on the GPU by bitsandbytes and cannot move
        wrapped.to(device)
    if config.gradient_checkpointing:
        wrapped.enable_gradient_checkpointing()
    wrapped.train()
    return wrapped


def sft_task_loss(
    config: SFTConfig, model: LocalLearningLM, device: torch.device, starting: torch.nn.Module | None = None
) -> TaskLoss:
    """SFT's task loss: cross entropy, plus --kl_beta x KL to the starting model: the base with its adapters disabled
    under --use_peft, else a frozen copy, `starting` when the caller loaded it, else loaded from
    --model_name_or_path (the starting model on resume too)."""
    if config.kl_beta <= 0:
        return CausalLMLoss(liger=config.liger)
    if model.uses_adapters:
        return KLRegularizedLoss(beta=config.kl_beta, reference=AdaptersDisabled())
    if starting is None:
        starting, _ = load_model_and_tokenizer(
            config.model_name_or_path, dtype=weights_dtype(config, device), trust_remote_code=config.trust_remote_code,
            device=device,
        )  # fmt: skip
    return KLRegularizedLoss(beta=config.kl_beta, reference=FrozenStartingModel(starting))


def adapter_summary(config: RunConfig, model: LocalLearningLM) -> str:
    """The start-up line's part on adapters and the parameters trained ('' without --use_peft)."""
    if not model.uses_adapters:
        return ""
    trainable, total = trainable_parameters(model)
    quantized = " (4-bit base)" if config.load_in_4bit else " (8-bit base)" if config.load_in_8bit else ""
    return (
        f" | LoRA r={config.lora_r}, alpha {config.lora_alpha} on {config.lora_target_modules}{quantized}: "
        f"{trainable:,} of {total:,} parameters trained"
    )


def validation_summary(
    config: RunConfig, best_step: int, best_metric: float, last_step: int, total_steps: int, restored: str | None
) -> str:
    """The line after a validated run: its best validation (--metric_for_best_model), why it stopped early when it
    did (only --early_stopping_patience ends a run before its last step and gets here), and the checkpoint whose
    weights became the final model (`restored`, with --load_best_model_at_end)."""
    metric = config.metric_for_best_model
    line = f"best validation: step {best_step}, {metric} {best_metric:.4f}"
    if last_step < total_steps:
        patience = config.early_stopping_patience
        line = (
            f"early stopping at step {last_step} of {total_steps}: {metric} has not improved for "
            f"{plural(patience, 'validation')} (--early_stopping_patience {patience}); {line}"
        )
    if restored:
        line += f"; the final model has its weights (--load_best_model_at_end, from {restored})"
    return line
