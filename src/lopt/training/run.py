"""Run set-up that every recipe shares: the output folder, the weights' dtype, the wrapped model.

A recipe (recipes/) calls these; nothing here knows which recipe runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lopt.config import RunConfig
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.models.registry import load_model_and_tokenizer


def prepare_output_dir(config: RunConfig) -> Path:
    """Refuse to mix this run's files with an earlier run's unless the user said so."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise LoptError(f"--output_dir {out} exists and is a file; pass a folder path.")
    resuming = config.resume_from_checkpoint is not None
    if out.is_dir() and any(out.iterdir()) and not (config.overwrite_output_dir or resuming):
        raise LoptError(
            f"--output_dir {out} is not empty (it holds an earlier run's files). Pass a new folder, "
            "--resume_from_checkpoint latest to continue that run, or --overwrite_output_dir to write into it "
            "(files with the same names are replaced)."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def weights_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    if config.fp16 and device.type != "cuda":
        raise LoptError("--fp16 needs a CUDA GPU (none found). Drop --fp16 to train in float32 on this machine.")
    bf16 = config.bf16
    if bf16 is None:  # auto: bf16 where the hardware has it
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def build_model(config: RunConfig, device: torch.device, weights: str | None = None):
    """The wrapped model; `weights` (a checkpoint folder) replaces the starting weights on resume."""
    model, tokenizer = load_model_and_tokenizer(
        weights or config.model_name_or_path,
        dtype=weights_dtype(config, device),
        trust_remote_code=config.trust_remote_code,
    )
    num_blocks = config.num_blocks if config.canonical_method == "lopt" else 1
    wrapped = LocalLearningLM(
        model, num_blocks=num_blocks, lambda_aux=config.lambda_aux, early_blocks=config.early_blocks
    ).to(device)
    if config.gradient_checkpointing:
        wrapped.enable_gradient_checkpointing()
    wrapped.train()
    return wrapped, tokenizer
