"""Supervised fine-tuning, end-to-end or with LoPT: a plain PyTorch loop, read as torchtune's recipes read.

`run_sft` is five named steps: set up (processes, model, data, optimizer), restore (on resume),
train (the loop below), save (checkpoints, inside the loop) and finish (the final model). Each
optimizer step of `_train` is: the next window of micro-batches -> `train_step` (training/step.py:
`forward_backward`, local or joint backward with the task loss the caller plugs in, then the parallel
backend's step: reduce, clip, check, apply) -> the schedule -> the listeners. The loop names no backend
and no listener: the progress bar, metrics.jsonl and anything passed as `callbacks` hear it through
training/callbacks.py. The rest of a step lives in training/ too: validation.py, early_stopping.py,
throughput.py, checkpoint.py (resumable checkpoints, with rng.py) and best_model.py.

With validation records (--eval_file, --eval_split, --eval_ratio) the loop validates every --eval_steps
and after the last step (training's forward without gradients), logs the validation losses in that step's
metrics.jsonl row, keeps the best validation's checkpoint for --load_best_model_at_end and stops after
--early_stopping_patience validations without improvement.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lopt.config import SFTConfig, eval_steps
from lopt.data.collate import collate, pack_examples, packing_summary, tokenize_sft
from lopt.data.order import batches_from, batches_per_epoch
from lopt.data.presets import sft_data_is_generated, sft_records, with_validation
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.output import console, phase, plural
from lopt.parallel import distributed
from lopt.parallel.backend import ParallelBackend
from lopt.parallel.launch import backend_from_environment
from lopt.runs import write_training_args
from lopt.training.best_model import CheckpointModel, best_to_restore
from lopt.training.callbacks import Callback, Callbacks, MetricsFile, ProgressBar, RunInfo
from lopt.training.checkpoint import (
    check_writable,
    find_checkpoint,
    load_training_state,
    save_final_model,
    save_training_checkpoint,
)
from lopt.training.early_stopping import BestValidation
from lopt.training.loss import liger_linear_cross_entropy
from lopt.training.memory import SavedTensorMeter, device_peak_bytes
from lopt.training.metrics import StepMetrics
from lopt.training.optim import build_optimizer, build_scheduler
from lopt.training.rng import set_rng_state
from lopt.training.run import (
    adapter_summary,
    build_model,
    prepare_output_dir,
    sft_task_loss,
    validation_summary,
    weights_dtype,
)
from lopt.training.signals import StopRequest
from lopt.training.step import EvalResult, StepTaken, train_step
from lopt.training.task_loss import TaskLoss
from lopt.training.throughput import Throughput
from lopt.training.trackers import tracker_callbacks
from lopt.training.validation import validate


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
    block_parameters: list[list[torch.nn.Parameter]] | None = None  # --block_step: each block's, in order
    eval_examples: list[dict] | None = None  # None: no validation records
    best: BestValidation = field(default_factory=BestValidation)
    last_step: int = 0  # the step training ended at (before total_steps when it stopped early)

    @property
    def best_checkpoint(self) -> Path | None:
        """The checkpoint --load_best_model_at_end restores, once there is one (never pruned)."""
        if not self.config.load_best_model_at_end or self.best.checkpoint is None:
            return None
        return Path(self.best.checkpoint)

    @property
    def main_process(self) -> bool:
        return distributed.is_main_process()


def run_sft(config: SFTConfig, task_loss: TaskLoss | None = None, callbacks: list[Callback] = ()) -> SFTResult:
    """Train `config`'s run. `task_loss` replaces the final block's objective (default: causal-LM cross
    entropy, training/task_loss.py); `callbacks` listen next to the progress bar and metrics.jsonl."""
    start = time.perf_counter()
    run = _set_up(config, task_loss, list(callbacks))
    try:
        _train(run, start)
        _finish(run)
    finally:
        run.backend.close()  # nothing of the backend outlives the run (the process group: distributed.shutdown)
    return SFTResult(
        output_dir=run.out,
        steps=run.last_step,
        first_loss=run.losses[0] if run.losses else None,
        last_loss=run.losses[-1] if run.losses else None,
        elapsed_s=time.perf_counter() - start,
        peak_mem_bytes=device_peak_bytes(run.backend.device),
        activation_peak_bytes=run.peak_activation,
        skipped_truncated=run.data_stats["skipped_truncated"],
    )


def _set_up(config: SFTConfig, task_loss: TaskLoss | None, listeners: list[Callback]) -> _Run:
    """Processes and backend, output folder, model (with resumed weights and heads), data, optimizer."""
    backend = backend_from_environment(config)
    if config.liger:
        liger_linear_cross_entropy(backend.device)  # fail before loading anything when it cannot run here
    main_process, world = distributed.is_main_process(), distributed.world_size()
    out = prepare_output_dir(config) if main_process else Path(config.output_dir)
    distributed.barrier()
    resume_dir = find_checkpoint(out, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    # before the model: a wrong --train_file, --eval_file or dataset fails without the load's wait
    load = functools.partial(sft_records, config)
    records, eval_records = with_validation(config, load, sft_data_is_generated(config))
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config, backend.device, weights=str(resume_dir) if resume_dir else None)
    state = load_training_state(resume_dir) if resume_dir else None
    if state is not None:
        model.aux_heads.load_state_dict(state["aux_heads"])  # full tensors: before sharding
    task_loss = task_loss or sft_task_loss(config, model, backend.device)
    backend.prepare_model(model)
    if main_process:
        check_writable(out, model)
    with phase("tokenizing the training data") as tokenizing:
        examples, data_stats = tokenize_sft(records, tokenizer, config.max_seq_length, config.prompt_format)
        tokenizing.result = (
            f"{plural(data_stats['examples'], 'example')}, {data_stats['trained_tokens']:,} trained tokens of "
            f"{data_stats['tokens']:,}, {data_stats['skipped_truncated']} skipped (answer truncated away)"
        )
    if config.packing:
        examples = pack_examples(examples, config.max_seq_length)
        data_stats["packed_sequences"] = len(examples)
    eval_examples = _tokenize_validation(config, eval_records, tokenizer) if eval_records is not None else None
    per_epoch = batches_per_epoch(len(examples), config.per_device_train_batch_size, world)
    if per_epoch == 0:
        unit = "packed sequence" if config.packing else "example"
        raise LoptError(
            f"{plural(len(examples), unit)} do not fill one global batch of {config.per_device_train_batch_size} x "
            f"{plural(world, 'process', 'processes')}; lower --per_device_train_batch_size or add data."
        )
    steps_per_epoch = max(per_epoch // config.gradient_accumulation_steps, 1)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    optimizer = build_optimizer(model, config.learning_rate, weight_decay=config.weight_decay, optim=config.optim)
    scheduler = build_scheduler(optimizer, config.lr_scheduler_type, config.warmup_ratio, total_steps)
    backend.prepare_optimizer(model, optimizer)
    run = _Run(
        config=config, backend=backend, out=out, model=model, tokenizer=tokenizer, examples=examples,
        data_stats=data_stats, optimizer=optimizer, scheduler=scheduler, task_loss=task_loss,
        callbacks=_listeners(config, resume_dir is not None, listeners),
        batches_per_epoch=per_epoch, total_steps=total_steps, resume_dir=resume_dir, eval_examples=eval_examples,
        block_parameters=model.block_parameters() if config.block_step else None,
    )  # fmt: skip
    if state is not None:
        _restore(run, state)
    if main_process:
        write_training_args(out, "sft", config.to_json())
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


def _restore(run: _Run, state: dict) -> None:
    """Resume: the optimizer (through the backend), the schedule, this process's RNG, the data position."""
    run.backend.load_state(run.resume_dir, state, run.model, run.optimizer)
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][distributed.rank()])
    run.start_step, run.position = state["step"], tuple(state["position"])
    run.best = BestValidation(**state.get("best", {}))  # checkpoints from before validation have none


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
        + adapter_summary(config, model)
        + (f" | KL to the starting model, beta {config.kl_beta}" if config.kl_beta > 0 else "")
        + (" | per-block optimizer steps (each block clipped by its own norm)" if config.block_step else "")
        + (" | each block clipped by its own gradient norm" if config.clip_per_block and not config.block_step else "")
        + f" | {plural(run.data_stats['examples'], 'example')} ({run.data_stats['skipped_truncated']} skipped: "
        f"response truncated away)"
        + (
            ", " + packing_summary(run.data_stats["packed_sequences"], run.data_stats["tokens"], config.max_seq_length)
            if config.packing
            else ""
        )
        + f" | effective batch {config.per_device_train_batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation x {plural(world, 'process', 'processes')} = "
        f"{plural(sequences, 'sequence')}"
        + f" | {plural(run.total_steps, 'step')} | device {run.backend.device}"
        + (
            f" | validating on {plural(len(run.eval_examples), 'example')} every {plural(eval_steps(config), 'step')}"
            if run.eval_examples is not None
            else ""
        )
        + (f" | {run.backend.name} across {world} processes" if run.backend.name != "replicated" else "")
        + (f" | resumed from {run.resume_dir} at step {run.start_step}" if run.resume_dir else "")
    )


def _train(run: _Run, start: float) -> None:
    """The loop: window -> forward and backward, the backend's step -> schedule -> listeners; then validation,
    checkpoints and stopping (a signal: save and exit; early stopping: leave the loop)."""
    config, backend = run.config, run.backend
    batches = batches_from(
        run.position, len(run.examples), config.per_device_train_batch_size, distributed.world_size(),
        distributed.rank(), config.seed,
    )  # fmt: skip
    meter = SavedTensorMeter(backend.local_parameters(run.model))
    throughput = Throughput(start)
    last_saved, step = None, run.start_step
    run.callbacks.on_train_begin(_run_info(run))
    with StopRequest() as stop:
        try:
            for step in range(run.start_step + 1, run.total_steps + 1):
                window = _next_window(run, batches)
                meter.reset_peak()
                taken = train_step(
                    run.model, window, backend, run.optimizer, run.task_loss, config.backward, step,
                    run.block_parameters, meter.active,
                )  # fmt: skip
                rates = run.scheduler.get_last_lr()  # the rates this step applied; the schedule moves on
                run.scheduler.step()
                run.losses.append(taken.result.task_loss)
                run.peak_activation = max(run.peak_activation, meter.peak_bytes)
                throughput.add(distributed.all_reduce_sum(taken.result.input_tokens, backend.device))
                run.callbacks.on_step_end(step, taken.result.task_loss)
                stopping = distributed.any_process(stop.requested, backend.device)
                validation, improved = _validate_when_due(run, step, throughput)
                logged = step % config.logging_steps == 0 or step == run.total_steps or stopping
                if run.main_process and (logged or validation is not None):
                    run.callbacks.on_log(_step_metrics(run, step, taken, rates, meter, throughput, validation))
                periodic = config.save_steps > 0 and step % config.save_steps == 0
                keep_best = improved and config.load_best_model_at_end  # restored at the end: it must be on disk
                if (periodic or stopping or keep_best) and step < run.total_steps:
                    last_saved = _save_checkpoint(run, step)
                if stopping and step < run.total_steps:
                    stop.exit_after_save(last_saved, step)
                if validation is not None and run.best.patience_spent(config.early_stopping_patience):
                    break
        finally:
            run.last_step = step
            run.callbacks.on_train_end(step)
    if run.main_process and run.best.step is not None:
        restored = run.best_checkpoint.name if run.best_checkpoint and run.best.step != step else None
        console.print(
            validation_summary(config, run.best.step, run.best.metric, step, run.total_steps, restored),
            highlight=False,
        )


def _next_window(run: _Run, batches) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of one optimizer step, on this process's device; advances the data position."""
    window = []
    for _ in range(run.config.gradient_accumulation_steps):
        run.position, indices = next(batches)
        batch = collate([run.examples[i] for i in indices], run.tokenizer.pad_token_id)
        window.append({k: v.to(run.backend.device) for k, v in batch.items()})
    return window


def _validate_when_due(run: _Run, step: int, throughput: Throughput) -> tuple[EvalResult | None, bool]:
    """After every --eval_steps-th step and the last: the validation losses (None when none is due; their seconds
    are not training's) and whether they are the best yet by --metric_for_best_model."""
    config = run.config
    if run.eval_examples is None or (step % eval_steps(config) != 0 and step != run.total_steps):
        return None, False
    validation, seconds = validate(
        run.model, run.eval_examples, run.tokenizer.pad_token_id, config.per_device_eval_batch_size, run.backend,
        run.task_loss, step,
    )  # fmt: skip
    throughput.exclude(seconds)
    metric = {"eval_task_loss": validation.task_loss}[config.metric_for_best_model]  # SFT's choices
    return validation, run.best.update(metric, step, config.BEST_MODEL_METRICS[config.metric_for_best_model])


def _tokenize_validation(config: SFTConfig, records: list[dict], tokenizer) -> list[dict]:
    with phase("tokenizing the validation data") as tokenizing:
        examples, stats = tokenize_sft(records, tokenizer, config.max_seq_length, config.prompt_format)
        tokenizing.result = (
            f"{plural(stats['examples'], 'example')}, {stats['trained_tokens']:,} trained tokens, "
            f"{stats['skipped_truncated']} skipped (answer truncated away)"
        )
    return examples


def _step_metrics(
    run: _Run,
    step: int,
    taken: StepTaken,
    rates: list[float],
    meter: SavedTensorMeter,
    throughput: Throughput,
    validation: EvalResult | None = None,
) -> StepMetrics:
    """The logged step as the metrics contract's record; `rates` are the learning rates the step used, `validation`
    the losses of a validation after it."""
    epoch, index = run.position
    result = taken.result
    return StepMetrics(
        step=step, epoch=round(epoch + index / run.batches_per_epoch, 4), task_loss=result.task_loss,
        aux_loss=result.aux_losses, lr=rates[-1], lr_k1=rates[0], grad_norm=taken.grad_norm,
        block_grad_norm=taken.block_norms, tokens_per_s=throughput.rate(),
        peak_mem_bytes=device_peak_bytes(run.backend.device), activation_peak_bytes=meter.peak_bytes,
        elapsed_s=throughput.elapsed(), eval_task_loss=validation.task_loss if validation else None,
        eval_aux_loss=validation.aux_losses if validation else None, recipe={"kl": result.terms.get("kl")},
    )  # fmt: skip


def _run_info(run: _Run) -> RunInfo:
    return RunInfo(
        recipe="sft", method=run.config.canonical_method, blocks=list(run.model.blocks), backward=run.config.backward,
        total_steps=run.total_steps, start_step=run.start_step, output_dir=run.out,
        world_size=distributed.world_size(), backend=run.backend.name, details=dict(run.data_stats),
    )  # fmt: skip


def _save_checkpoint(run: _Run, step: int) -> Path | None:
    """Write checkpoint-`step`/ with what resuming needs (every process takes part: `save_training_checkpoint`)."""
    if run.best.step == step:
        run.best.checkpoint = str(run.out / f"checkpoint-{step}")
    loop = {"position": run.position, "scheduler": run.scheduler.state_dict(), "best": dataclasses.asdict(run.best)}
    saved = save_training_checkpoint(
        run.out, step, run.backend, run.model, run.optimizer, run.tokenizer, loop, run.config.save_total_limit,
        run.best_checkpoint,
    )  # fmt: skip
    if saved is not None:
        run.callbacks.on_save(saved)
    return saved


def _finish(run: _Run) -> None:
    """The final model, a plain Hugging Face folder in --output_dir (gathered where sharded; with
    --load_best_model_at_end the best validation's checkpoint's); then the listeners hear it is complete (the CLI's
    publisher writes lopt's model card and, with --push_to_hub, uploads it)."""
    config = run.config
    best = best_to_restore(run.best_checkpoint, run.best.step, run.last_step)
    if config.merge_lora and best is None:
        run.model.merge_adapters()
    if best is not None:
        dtype = weights_dtype(config, run.backend.device)
        final = CheckpointModel(best, config.merge_lora, dtype, config.trust_remote_code)
    else:
        final = run.backend.full_state(run.model).model
    if run.main_process:
        with phase(f"saving the model to {run.out}" + (f" (the best validation's, {best.name})" if best else "")):
            save_final_model(run.out, final, run.tokenizer)
    distributed.barrier()
    if run.main_process:
        run.callbacks.on_model_saved(run.out)
