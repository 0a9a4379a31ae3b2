"""Supervised fine-tuning, end-to-end or with LoPT: a plain PyTorch loop.

`run_sft` is five named steps: set up (processes, model, data, optimizer), restore (on resume),
train (the loop below), save (checkpoints, inside the loop) and finish (the final model). One
optimizer step is `forward_backward` (training/step.py: local or joint backward over the window,
with the task loss the caller plugs in) followed by `backend.step` (parallel/: reduce, clip,
check, apply), then the schedule. The loop names no backend and no listener: the progress bar,
metrics.jsonl and anything passed as `callbacks` hear it through training/callbacks.py.
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lopt.config import SFTConfig, save_config
from lopt.data.collate import collate, tokenize_sft
from lopt.data.order import batches_from, batches_per_epoch
from lopt.data.presets import load_records, source_options
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.output import console, phase
from lopt.parallel import distributed
from lopt.parallel.backend import ParallelBackend
from lopt.parallel.launch import backend_from_environment
from lopt.training.callbacks import Callback, Callbacks, MetricsFile, ProgressBar, RunInfo
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
from lopt.training.metrics import StepMetrics
from lopt.training.optim import build_optimizer, build_scheduler
from lopt.training.run import build_model, prepare_output_dir
from lopt.training.signals import StopRequest
from lopt.training.step import StepResult, check_finite, forward_backward
from lopt.training.task_loss import CausalLMLoss, TaskLoss
from lopt.training.trackers import tracker_callbacks


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


@dataclass
class _Run:
    """What the steps of one run share once it is set up."""

    config: SFTConfig
    backend: ParallelBackend
    out: Path
    model: LocalLearningLM
    tokenizer: object
    examples: list[dict]
    data_stats: dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    task_loss: TaskLoss
    callbacks: Callbacks
    batches_per_epoch: int
    total_steps: int
    resume_dir: Path | None
    start_step: int = 0
    position: tuple[int, int] = (0, 0)  # (epoch, batch index) of the next batch
    losses: list[float] = field(default_factory=list)
    peak_activation: int = 0

    @property
    def main_process(self) -> bool:
        return distributed.is_main_process()


def run_sft(config: SFTConfig, task_loss: TaskLoss | None = None, callbacks: list[Callback] = ()) -> SFTResult:
    """Train `config`'s run. `task_loss` replaces the final block's objective (default: causal-LM cross
    entropy, training/task_loss.py); `callbacks` listen next to the progress bar and metrics.jsonl."""
    start = time.perf_counter()
    run = _set_up(config, task_loss or CausalLMLoss(liger=config.liger), list(callbacks))
    _train(run, start)
    _finish(run)
    return SFTResult(
        output_dir=run.out,
        steps=run.total_steps,
        first_loss=run.losses[0] if run.losses else None,
        last_loss=run.losses[-1] if run.losses else None,
        elapsed_s=time.perf_counter() - start,
        peak_mem_bytes=device_peak_bytes(run.backend.device),
        activation_peak_bytes=run.peak_activation,
        skipped_truncated=run.data_stats["skipped_truncated"],
    )


def _set_up(config: SFTConfig, task_loss: TaskLoss, listeners: list[Callback]) -> _Run:
    """Processes and backend, output folder, model (with resumed weights and heads), data, optimizer."""
    backend = backend_from_environment(config)
    if config.liger:
        liger_linear_cross_entropy(backend.device)  # fail before loading anything when it cannot run here
    main_process, world = distributed.is_main_process(), distributed.world_size()
    out = prepare_output_dir(config) if main_process else Path(config.output_dir)
    distributed.barrier()
    resume_dir = find_checkpoint(out, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config, backend.device, weights=str(resume_dir) if resume_dir else None)
    state = load_training_state(resume_dir) if resume_dir else None
    if state is not None:
        model.aux_heads.load_state_dict(state["aux_heads"])  # full tensors: before sharding
    backend.prepare_model(model)
    if main_process:
        check_writable(out, model)
    with phase("tokenizing the training data") as tokenizing:
        examples, data_stats = tokenize_sft(_records(config), tokenizer, config.max_seq_length, config.prompt_format)
        tokenizing.result = (
            f"{data_stats['examples']:,} examples, {data_stats['trained_tokens']:,} trained tokens of "
            f"{data_stats['tokens']:,}, {data_stats['skipped_truncated']} skipped (answer truncated away)"
        )
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
    backend.prepare_optimizer(model, optimizer)
    run = _Run(
        config=config, backend=backend, out=out, model=model, tokenizer=tokenizer, examples=examples,
        data_stats=data_stats, optimizer=optimizer, scheduler=scheduler, task_loss=task_loss,
        callbacks=_listeners(config, resume_dir is not None, listeners),
        batches_per_epoch=per_epoch, total_steps=total_steps, resume_dir=resume_dir,
    )  # fmt: skip
    if state is not None:
        _restore(run, state)
    if main_process:
        save_config(config, out / "training_args.json")
        console.print(_start_line(run))
    return run


def _listeners(config: SFTConfig, resuming: bool, extra: list[Callback]) -> Callbacks:
    """The main process's listeners: progress bar (unless a listener draws progress itself), metrics.jsonl, the
    --report_to trackers, then the caller's."""
    if not distributed.is_main_process():
        return Callbacks([])
    progress = [] if any(listener.draws_progress for listener in extra) else [ProgressBar(console)]
    own = [*progress, MetricsFile(append=resuming), *tracker_callbacks(config.report_to, config)]
    return Callbacks(own + extra)


def _records(config: SFTConfig) -> list[dict]:
    # The default preset yields to a file or hub dataset silently; an explicit one is reported as ignored.
    explicit_source = config.train_file or config.dataset_name
    preset = config.dataset_preset if "dataset_preset" in config.explicit or not explicit_source else None
    return load_records(preset=preset, **source_options(config))


def _restore(run: _Run, state: dict) -> None:
    """Resume: the optimizer (through the backend), the schedule, this process's RNG, the data position."""
    run.backend.load_state(run.resume_dir, state, run.model, run.optimizer)
    run.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][distributed.rank()])
    run.start_step, run.position = state["step"], tuple(state["position"])


def _start_line(run: _Run) -> str:
    config, model, world = run.config, run.model, distributed.world_size()
    sequences = config.per_device_train_batch_size * config.gradient_accumulation_steps * world
    blocks = ", ".join(str(len(b)) for b in model.blocks)
    return (
        f"[bold]lopt sft[/]: {config.canonical_method}"
        + (
            f" k={model.num_blocks} ({blocks} layers), {config.backward} backward, early blocks {config.early_blocks}"
            if model.num_blocks > 1
            else ""
        )
        + f" | {run.data_stats['examples']} examples ({run.data_stats['skipped_truncated']} skipped: response "
        f"truncated away) | effective batch {config.per_device_train_batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation x {world} processes = {sequences} sequences"
        + f" | {run.total_steps} steps | device {run.backend.device}"
        + (f" | {run.backend.name} across {world} processes" if run.backend.name != "replicated" else "")
        + (f" | resumed from {run.resume_dir} at step {run.start_step}" if run.resume_dir else "")
    )


def _train(run: _Run, start: float) -> None:
    config, model, backend = run.config, run.model, run.backend
    batches = batches_from(
        run.position, len(run.examples), config.per_device_train_batch_size, distributed.world_size(),
        distributed.rank(), config.seed,
    )  # fmt: skip
    meter = SavedTensorMeter(backend.local_parameters(model))
    throughput = _Throughput(start)
    last_saved, step = None, run.start_step
    run.callbacks.on_train_begin(_run_info(run))
    with StopRequest() as stop:
        try:
            for step in range(run.start_step + 1, run.total_steps + 1):
                window = _next_window(run, batches)
                meter.reset_peak()
                with meter.active(), backend.autocast():
                    result = forward_backward(
                        model, window, config.backward, backend.backward, run.task_loss, backend.lm_head_context
                    )
                rates = run.scheduler.get_last_lr()  # the rates this step applies; the schedule moves on below
                grad_norm = backend.step(model, run.optimizer, functools.partial(check_finite, result, step=step))
                run.scheduler.step()
                run.losses.append(result.task_loss)
                run.peak_activation = max(run.peak_activation, meter.peak_bytes)
                throughput.add(distributed.all_reduce_sum(result.input_tokens, backend.device))
                run.callbacks.on_step_end(step, result.task_loss)
                stopping = distributed.any_process(stop.requested, backend.device)
                if run.main_process and (step % config.logging_steps == 0 or step == run.total_steps or stopping):
                    run.callbacks.on_log(_step_metrics(run, step, result, rates, grad_norm, meter, throughput))
                periodic = config.save_steps > 0 and step % config.save_steps == 0
                if (periodic or stopping) and step < run.total_steps:
                    last_saved = _save_checkpoint(run, step)
                if stopping and step < run.total_steps:
                    stop.exit_after_save(last_saved, step)
        finally:
            run.callbacks.on_train_end(step)


def _step_metrics(
    run: _Run,
    step: int,
    result: StepResult,
    rates: list[float],
    grad_norm: float,
    meter: SavedTensorMeter,
    throughput: _Throughput,
) -> StepMetrics:
    """The logged step as the metrics contract's record; `rates` are the learning rates the step used."""
    epoch, index = run.position
    return StepMetrics(
        step=step, epoch=round(epoch + index / run.batches_per_epoch, 4), task_loss=result.task_loss,
        aux_loss=result.aux_losses, lr=rates[-1], lr_k1=rates[0], grad_norm=grad_norm,
        tokens_per_s=throughput.rate(), peak_mem_bytes=device_peak_bytes(run.backend.device),
        activation_peak_bytes=meter.peak_bytes, elapsed_s=throughput.elapsed(),
    )  # fmt: skip


def _next_window(run: _Run, batches) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of one optimizer step, on this process's device; advances the data position."""
    window = []
    for _ in range(run.config.gradient_accumulation_steps):
        run.position, indices = next(batches)
        batch = collate([run.examples[i] for i in indices], run.tokenizer.pad_token_id)
        window.append({k: v.to(run.backend.device) for k, v in batch.items()})
    return window


class _Throughput:
    """Input tokens per second over each logging window, and seconds since training started."""

    def __init__(self, start: float):
        self.start = self.window_start = start
        self.tokens = 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / (now - self.window_start)
        self.tokens, self.window_start = 0.0, now
        return rate

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _run_info(run: _Run) -> RunInfo:
    return RunInfo(
        recipe="sft", method=run.config.canonical_method, blocks=list(run.model.blocks), backward=run.config.backward,
        total_steps=run.total_steps, start_step=run.start_step, output_dir=run.out,
        world_size=distributed.world_size(), backend=run.backend.name, details=dict(run.data_stats),
    )  # fmt: skip


def _save_checkpoint(run: _Run, step: int) -> Path | None:
    """Write checkpoint-`step`/ (every process takes part: gathering is a collective under FSDP and
    ZeRO-3, and under DeepSpeed each process writes its optimizer partition into the folder)."""
    rng = _gather_rng_states(run.backend.device)
    full = run.backend.full_state(run.model, run.optimizer)
    folder = distributed.broadcast_from_main(new_temp_folder(run.out) if run.main_process else None)
    run.backend.save_state(folder)
    saved = None
    if run.main_process:
        state = {
            "step": step, "position": run.position, "aux_heads": full.aux_heads, "optimizer": full.optimizer,
            "scheduler": run.scheduler.state_dict(), "rng": rng, **run.backend.state_dict(),
        }  # fmt: skip
        saved = save_checkpoint(run.out, step, full.model, run.tokenizer, state, folder)
        prune_checkpoints(run.out, run.config.save_total_limit)
        run.callbacks.on_save(saved)
    distributed.barrier()
    return saved


def _finish(run: _Run) -> None:
    """The final model, a plain Hugging Face folder in --output_dir (gathered where sharded)."""
    final = run.backend.full_state(run.model)
    if run.main_process:
        with phase(f"saving the model to {run.out}"):
            save_final_model(run.out, final.model, run.tokenizer)
    distributed.barrier()


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


def _gather_rng_states(device: torch.device) -> list[dict]:
    """Every process's RNG state, so each resumes its own stream (one entry per rank)."""
    if distributed.world_size() == 1:
        return [_rng_state()]
    states = [None] * distributed.world_size()
    torch.distributed.all_gather_object(states, _rng_state())
    return states
