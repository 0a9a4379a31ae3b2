"""Supervised fine-tuning, end-to-end or with LoPT: a plain PyTorch loop.

The whole training step is `train_step` below: forward/backward over the accumulation window
(local or joint backward, see step.py), gradient sync across processes, global-norm clipping,
a finiteness check, then the optimizer and schedule.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lopt.config import SFTConfig, save_config
from lopt.data.collate import collate, tokenize_sft
from lopt.data.presets import load_records
from lopt.errors import LoptError
from lopt.models.lopt import LocalLearningLM
from lopt.models.registry import load_model_and_tokenizer
from lopt.training.checkpoint import save_checkpoint, save_final_model
from lopt.training.memory import SavedTensorMeter, device_peak_bytes
from lopt.training.optim import build_optimizer, build_scheduler
from lopt.training.step import average_gradients_across_processes, check_finite, forward_backward

console = Console(stderr=True)


@dataclass
class SFTResult:
    output_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    elapsed_s: float
    peak_mem_bytes: int
    activation_peak_bytes: int
    skipped_truncated: int


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_output_dir(config: SFTConfig) -> Path:
    """Refuse to mix this run's files with an earlier run's unless the user said so."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise LoptError(f"--output_dir {out} exists and is a file; pass a folder path.")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite_output_dir:
        raise LoptError(
            f"--output_dir {out} is not empty (it holds an earlier run's files). Pass a new folder, "
            "or --overwrite_output_dir to write into it (files with the same names are replaced)."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def weights_dtype(config: SFTConfig, device: torch.device) -> torch.dtype:
    if config.fp16 and device.type != "cuda":
        raise LoptError("--fp16 needs a CUDA GPU (none found). Drop --fp16 to train in float32 on this machine.")
    bf16 = config.bf16
    if bf16 is None:  # auto: bf16 where the hardware has it
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: SFTConfig, device: torch.device):
    model, tokenizer = load_model_and_tokenizer(
        config.model_name_or_path, dtype=weights_dtype(config, device), trust_remote_code=config.trust_remote_code
    )
    num_blocks = config.num_blocks if config.canonical_method == "lopt" else 1
    wrapped = LocalLearningLM(model, num_blocks=num_blocks, lambda_aux=config.lambda_aux).to(device)
    if config.gradient_checkpointing:
        wrapped.enable_gradient_checkpointing()
    wrapped.train()
    return wrapped, tokenizer


def micro_batches(loader, epochs: int):
    """Yield (epoch as a float, batch) for as many epochs as needed."""
    for epoch in range(epochs):
        for i, batch in enumerate(loader):
            yield epoch + (i + 1) / len(loader), batch


def train_step(model, window, config, optimizer, scheduler, scaler, step, autocast):
    with autocast:
        result = forward_backward(model, window, config.backward, scale_loss=scaler.scale if scaler else (lambda x: x))
    params = [p for p in model.parameters() if p.requires_grad]
    average_gradients_across_processes(params)
    if scaler:
        scaler.unscale_(optimizer)
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    check_finite(result, 0.0 if scaler else grad_norm, step)  # with fp16 the scaler skips inf steps itself
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return result, grad_norm


def run_sft(config: SFTConfig) -> SFTResult:
    device = pick_device()
    out = prepare_output_dir(config)
    seed_everything(config.seed)
    model, tokenizer = build_model(config, device)
    records = load_records(
        preset=config.dataset_preset, dataset_name=config.dataset_name, dataset_config=config.dataset_config,
        train_file=config.train_file, split=config.split, max_samples=config.max_samples, seed=config.seed,
    )
    examples, data_stats = tokenize_sft(records, tokenizer, config.max_seq_length)
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(
        examples, batch_size=config.per_device_train_batch_size, shuffle=True, generator=generator,
        collate_fn=lambda items: collate(items, tokenizer.pad_token_id),
    )
    steps_per_epoch = max(len(loader) // config.gradient_accumulation_steps, 1)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    epochs = math.ceil(total_steps * config.gradient_accumulation_steps / len(loader))

    optimizer = build_optimizer(model, config.learning_rate, config.lr_k1, config.weight_decay)
    scheduler = build_scheduler(optimizer, config.lr_scheduler_type, config.warmup_ratio, total_steps)
    scaler = torch.amp.GradScaler("cuda") if config.fp16 else None
    autocast = torch.autocast("cuda", dtype=torch.float16) if config.fp16 else nullcontext()
    meter = SavedTensorMeter(model.parameters())
    save_config(config, out / "training_args.json")

    console.print(
        f"[bold]lopt sft[/]: {config.canonical_method}"
        + (f" k={model.num_blocks} ({', '.join(str(len(b)) for b in model.blocks)} layers), {config.backward} backward"
           if model.num_blocks > 1 else "")
        + f" | {data_stats['examples']} examples ({data_stats['skipped_truncated']} skipped: response truncated away)"
        + f" | {total_steps} steps x {config.per_device_train_batch_size * config.gradient_accumulation_steps} "
          f"sequences | device {device}"
    )
    batches = micro_batches(loader, epochs)
    losses, window_tokens, start = [], 0, time.perf_counter()
    log_start, first_loss, peak_activation = start, None, 0
    with (out / "metrics.jsonl").open("w") as metrics, Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task("training", total=total_steps)
        for step in range(1, total_steps + 1):
            window = []
            for _ in range(config.gradient_accumulation_steps):
                epoch, batch = next(batches)
                window.append({k: v.to(device) for k, v in batch.items()})
            meter.reset_peak()
            with meter.active():
                result, grad_norm = train_step(model, window, config, optimizer, scheduler, scaler, step, autocast)
            peak_activation = max(peak_activation, meter.peak_bytes)
            first_loss = result.task_loss if first_loss is None else first_loss
            losses.append(result.task_loss)
            window_tokens += result.input_tokens
            progress.update(task, advance=1, description=f"training  loss {result.task_loss:.4f}")
            if step % config.logging_steps == 0 or step == total_steps:
                now = time.perf_counter()
                record = {
                    "step": step, "epoch": round(epoch, 4), "task_loss": result.task_loss,
                    "aux_loss": result.aux_losses, "lr": scheduler.get_last_lr()[-1],
                    "lr_k1": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / (now - log_start), "peak_mem_bytes": device_peak_bytes(device),
                    "activation_peak_bytes": meter.peak_bytes, "elapsed_s": now - start,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                window_tokens, log_start = 0, now
            if config.save_steps > 0 and step % config.save_steps == 0 and step < total_steps:
                state = {"step": step, "aux_heads": model.aux_heads.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
                save_checkpoint(out, step, model, tokenizer, state)
    save_final_model(out, model, tokenizer)
    return SFTResult(
        output_dir=out, steps=total_steps, first_loss=first_loss, last_loss=losses[-1],
        elapsed_s=time.perf_counter() - start, peak_mem_bytes=device_peak_bytes(device),
        activation_peak_bytes=peak_activation, skipped_truncated=data_stats["skipped_truncated"],
    )
