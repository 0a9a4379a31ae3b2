"""Supervised fine-tuning, end-to-end or with LoPT: a plain PyTorch loop.

The whole training step is `train_step` below: forward/backward over the accumulation window
(local or joint backward, see step.py), gradient sync across processes (done by FSDP itself when
accelerate's FSDP2 config shards the model, see parallel/fsdp.py), global-norm clipping,
a finiteness check, then the optimizer and schedule. Under accelerate's DeepSpeed config the
engine reduces, clips and steps instead (parallel/deepspeed.py). `run_sft` around it sets the run up, logs,
checkpoints, resumes, and stops cleanly on SIGINT / SIGTERM.
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
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lopt.config import SFTConfig, save_config
from lopt.data.collate import collate, tokenize_sft
from lopt.data.order import batches_from, batches_per_epoch
from lopt.data.presets import load_records
from lopt.errors import LoptError
from lopt.parallel import deepspeed as zero
from lopt.parallel import distributed
from lopt.parallel import fsdp as sharding
from lopt.training.checkpoint import (
    check_writable,
    find_checkpoint,
    load_training_state,
    new_temp_folder,
    prune_checkpoints,
    save_checkpoint,
    save_final_model,
)
from lopt.training.loss import liger_linear_cross_entropy
from lopt.training.memory import SavedTensorMeter, device_peak_bytes
from lopt.training.optim import build_optimizer, build_scheduler
from lopt.training.run import build_model, console, prepare_output_dir, weights_dtype
from lopt.training.signals import StopRequest
from lopt.training.step import all_reduce_gradients, check_finite, forward_backward


@dataclass
class SFTResult:
    output_dir: Path
    steps: int
    first_loss: float | None  # None when a resumed run had no step left to take
    last_loss: float | None
    elapsed_s: float
    peak_mem_bytes: int
    activation_peak_bytes: int
    skipped_truncated: int


def train_step(model, window, config, optimizer, scheduler, scaler, step, autocast, engine=None):
    if engine is not None:  # DeepSpeed: its engine reduces, clips and steps the partitioned optimizer
        result = forward_backward(
            model, window, config.backward, zero.backward(engine), config.liger, lambda: zero.gathered_lm_head(model)
        )
        check_finite(result, 0.0, step)  # the losses, before the step
        grad_norm = zero.optimizer_step(engine)
        scheduler.step()
        check_finite(result, grad_norm, step, step_taken=True)
        return result, grad_norm
    with autocast:
        result = forward_backward(
            model,
            window,
            config.backward,
            (lambda loss: scaler.scale(loss).backward()) if scaler else torch.Tensor.backward,
            liger=config.liger,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not sharding.is_sharded(model):  # FSDP has already summed the gradients into each shard
        all_reduce_gradients(params)
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


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_sft(config: SFTConfig) -> SFTResult:
    fsdp = sharding.fsdp_settings_from_environment(config)  # None unless launched with accelerate's FSDP2 config
    deepspeed = zero.zero_settings_from_environment(config)  # None unless launched with a DeepSpeed config
    device = distributed.init_from_environment("FSDP" if fsdp else "DeepSpeed" if deepspeed else None)
    if config.liger:
        liger_linear_cross_entropy(device)  # fail before loading anything when it cannot run here
    main_process, world = distributed.is_main_process(), distributed.world_size()
    out = prepare_output_dir(config) if main_process else Path(config.output_dir)
    distributed.barrier()
    resume_dir = find_checkpoint(out, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config, device, weights=str(resume_dir) if resume_dir else None)
    state = load_training_state(resume_dir) if resume_dir else None
    if state is not None:
        model.aux_heads.load_state_dict(state["aux_heads"])  # full tensors: before sharding
    if fsdp is not None:
        sharding.shard_model(model, fsdp, device)
    if main_process:
        check_writable(out, model)
    # The default preset yields to a file or hub dataset silently; an explicit one is reported as ignored.
    explicit_source = config.train_file or config.dataset_name
    records = load_records(
        preset=config.dataset_preset if "dataset_preset" in config.explicit or not explicit_source else None,
        dataset_name=config.dataset_name,
        dataset_config=config.dataset_config,
        train_file=config.train_file,
        split=config.split,
        max_samples=config.max_samples,
        seed=config.seed,
    )
    examples, data_stats = tokenize_sft(records, tokenizer, config.max_seq_length)
    per_epoch = batches_per_epoch(len(examples), config.per_device_train_batch_size, world)
    if per_epoch == 0:
        raise LoptError(
            f"{len(examples)} examples do not fill one global batch of {config.per_device_train_batch_size} x {world} "
            "processes; lower --per_device_train_batch_size or add data."
        )
    steps_per_epoch = max(per_epoch // config.gradient_accumulation_steps, 1)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)

    optimizer = build_optimizer(model, config.learning_rate, config.lr_k1, config.weight_decay)
    scheduler = build_scheduler(optimizer, config.lr_scheduler_type, config.warmup_ratio, total_steps)
    scaler = torch.amp.GradScaler("cuda") if config.fp16 else None
    autocast = torch.autocast("cuda", dtype=torch.float16) if config.fp16 else nullcontext()
    engine = zero.initialize(model, optimizer, deepspeed, config, weights_dtype(config, device)) if deepspeed else None
    start_step, position = 0, (0, 0)
    if state is not None:
        zero.check_resumable(resume_dir, state, engine)
        if engine is not None:
            zero.load_engine_state(engine, resume_dir)
        else:
            sharding.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][distributed.rank()])
        start_step, position = state["step"], tuple(state["position"])
    meter = SavedTensorMeter(sharding.local_parameters(model))
    if main_process:
        save_config(config, out / "training_args.json")
        console.print(
            f"[bold]lopt sft[/]: {config.canonical_method}"
            + (
                f" k={model.num_blocks} ({', '.join(str(len(b)) for b in model.blocks)} layers), "
                f"{config.backward} backward, early blocks {config.early_blocks}"
                if model.num_blocks > 1
                else ""
            )
            + f" | {data_stats['examples']} examples ({data_stats['skipped_truncated']} skipped: response truncated"
            f" away) | effective batch {config.per_device_train_batch_size} x {config.gradient_accumulation_steps}"
            f" accumulation x {world} processes = "
            f"{config.per_device_train_batch_size * config.gradient_accumulation_steps * world} sequences"
            + f" | {total_steps} steps | device {device}"
            + (f" | FSDP2 across {world} processes" if fsdp else "")
            + (f" | DeepSpeed ZeRO-{deepspeed.stage} across {world} processes" if deepspeed else "")
            + (f" | resumed from {resume_dir} at step {start_step}" if resume_dir else "")
        )

    batches = batches_from(
        position, len(examples), config.per_device_train_batch_size, world, distributed.rank(), config.seed
    )
    losses, window_tokens, start = [], 0, time.perf_counter()
    log_start, peak_activation, last_saved = start, 0, None
    metrics = (out / "metrics.jsonl").open("a" if resume_dir else "w") if main_process else None
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=console,
        disable=not main_process,
    )
    with StopRequest() as stop, progress, metrics or nullcontext():
        task = progress.add_task("training", total=total_steps, completed=start_step)
        for step in range(start_step + 1, total_steps + 1):
            window = []
            for _ in range(config.gradient_accumulation_steps):
                position, indices = next(batches)
                batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
                window.append({k: v.to(device) for k, v in batch.items()})
            meter.reset_peak()
            with meter.active():
                result, grad_norm = train_step(
                    model, window, config, optimizer, scheduler, scaler, step, autocast, engine
                )
            peak_activation = max(peak_activation, meter.peak_bytes)
            losses.append(result.task_loss)
            window_tokens += distributed.all_reduce_sum(result.input_tokens, device)
            progress.update(task, advance=1, description=f"training  loss {result.task_loss:.4f}")
            if main_process and (step % config.logging_steps == 0 or step == total_steps):
                now = time.perf_counter()
                record = {
                    "step": step,
                    "epoch": round(position[0] + position[1] / per_epoch, 4),
                    "task_loss": result.task_loss,
                    "aux_loss": result.aux_losses,
                    "lr": scheduler.get_last_lr()[-1],
                    "lr_k1": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / (now - log_start),
                    "peak_mem_bytes": device_peak_bytes(device),
                    "activation_peak_bytes": meter.peak_bytes,
                    "elapsed_s": now - start,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                window_tokens, log_start = 0, now
            stopping = distributed.any_process(stop.requested, device)
            periodic = config.save_steps > 0 and step % config.save_steps == 0 and step < total_steps
            if periodic or (stopping and step < total_steps):
                rng = _gather_rng_states(device)
                # Every process takes part: gathering is a collective under FSDP and ZeRO-3, and under
                # DeepSpeed each process writes its optimizer partition into the checkpoint being built.
                full = zero.full_state(engine, model) if engine else sharding.full_state(model, optimizer)
                started = distributed.broadcast_from_main(new_temp_folder(out) if main_process else None)
                if engine is not None:
                    zero.save_engine_state(engine, started)
                    distributed.barrier()
                if main_process:
                    state = {
                        "step": step,
                        "position": position,
                        "aux_heads": full.aux_heads,
                        "optimizer": full.optimizer,
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler else None,
                        "rng": rng,
                        "deepspeed": zero.describe(engine) if engine else None,
                    }
                    last_saved = save_checkpoint(out, step, full.model, tokenizer, state, started)
                    prune_checkpoints(out, config.save_total_limit)
                distributed.barrier()
            if stopping and step < total_steps:
                stop.exit_after_save(last_saved, step)
    final = zero.full_state(engine, model) if engine else sharding.full_state(model)
    if main_process:
        save_final_model(out, final.model, tokenizer)
    distributed.barrier()
    return SFTResult(
        output_dir=out,
        steps=total_steps,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        elapsed_s=time.perf_counter() - start,
        peak_mem_bytes=device_peak_bytes(device),
        activation_peak_bytes=peak_activation,
        skipped_truncated=data_stats["skipped_truncated"],
    )


def _gather_rng_states(device: torch.device) -> list[dict]:
    """Every process's RNG state, so each resumes its own stream (one entry per rank)."""
    if distributed.world_size() == 1:
        return [_rng_state()]
    states = [None] * distributed.world_size()
    torch.distributed.all_gather_object(states, _rng_state())
    return states
