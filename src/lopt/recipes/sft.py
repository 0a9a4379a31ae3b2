"""Supervised fine-tuning, end-to-end or with LoPT: a plain PyTorch loop.

`run_sft` is five named steps: set up (processes, model, data, optimizer), restore (on resume),
train (the loop below), save (checkpoints, inside the loop) and finish (the final model). One
optimizer step is `forward_backward` (training/step.py: local or joint backward over the window,
with the task loss the caller plugs in) followed by `backend.step` (parallel/: reduce, clip,
check, apply), then the schedule. The loop names no backend and no listener: the progress bar,
metrics.jsonl and anything passed as `callbacks` hear it through training/callbacks.py.

With validation records (--eval_file, --eval_split, --eval_ratio) the loop validates every --eval_steps
and after the last step (`evaluate` in training/step.py: training's forward without gradients), logs
the validation losses in that step's metrics.jsonl row, keeps the best validation's checkpoint for
--load_best_model_at_end and stops after --early_stopping_patience validations without improvement.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lopt.config import SFTConfig, eval_steps, save_config
from lopt.data.collate import collate, pack_examples, packing_summary, tokenize_sft
from lopt.data.order import batches_from, batches_per_epoch, eval_batches
from lopt.data.presets import sft_data_is_generated, sft_records, with_validation
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.models.lora import is_adapter_folder
from lopt.models.registry import load_model_and_tokenizer
from lopt.output import console, phase, plural
from lopt.parallel import distributed
from lopt.parallel.backend import ParallelBackend
from lopt.parallel.launch import backend_from_environment
from lopt.tools.publish import publish_run
from lopt.training.callbacks import Callback, Callbacks, MetricsFile, ProgressBar, RunInfo
from lopt.training.checkpoint import (
    TRAINING_STATE,
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
from lopt.training.run import (
    adapter_summary,
    build_model,
    prepare_output_dir,
    validation_summary,
    weights_dtype,
)
from lopt.training.signals import StopRequest
from lopt.training.step import EvalResult, StepResult, check_finite, evaluate, forward_backward, stop_unless_finite
from lopt.training.task_loss import (
    AdaptersDisabled,
    CausalLMLoss,
    FrozenStartingModel,
    KLRegularizedLoss,
    TaskLoss,
)
from lopt.training.trackers import tracker_callbacks

logger = logging.getLogger(__name__)


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
class _Best:
    """The best validation so far by --metric_for_best_model, and the validations since it (early stopping)."""

    metric: float | None = None
    step: int | None = None
    since: int = 0
    checkpoint: str | None = None  # the best step's checkpoint once written (a resumed run's may be elsewhere)

    def update(self, value: float, step: int, greater_is_better: bool) -> bool:
        """Count validation `value` at `step`; True when it is a new best (strictly better, as transformers')."""
        better = self.metric is None or (value > self.metric if greater_is_better else value < self.metric)
        if better:
            self.metric, self.step, self.since, self.checkpoint = value, step, 0, None
        else:
            self.since += 1
        return better


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
    best: _Best = field(default_factory=_Best)
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
    task_loss = task_loss or _task_loss(config, model, backend.device)
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
        save_config(config, out / "training_args.json")
        console.print(_start_line(run))
    return run


def _task_loss(config: SFTConfig, model: LocalLearningLM, device: torch.device) -> TaskLoss:
    """Cross entropy, plus --kl_beta x KL to the starting model: the base with its adapters disabled under
    --use_peft, else a frozen copy loaded from --model_name_or_path (the starting model on resume too)."""
    if config.kl_beta <= 0:
        return CausalLMLoss(liger=config.liger)
    if model.uses_adapters:
        return KLRegularizedLoss(beta=config.kl_beta, reference=AdaptersDisabled())
    starting, _ = load_model_and_tokenizer(
        config.model_name_or_path, dtype=weights_dtype(config, device), trust_remote_code=config.trust_remote_code,
        device=device,
    )  # fmt: skip
    return KLRegularizedLoss(beta=config.kl_beta, reference=FrozenStartingModel(starting))


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
    _set_rng_state(state["rng"][distributed.rank()])
    run.start_step, run.position = state["step"], tuple(state["position"])
    run.best = _Best(**state.get("best", {}))  # checkpoints from before validation have none


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
    config, model, backend = run.config, run.model, run.backend
    batches = batches_from(
        run.position, len(run.examples), config.per_device_train_batch_size, distributed.world_size(),
        distributed.rank(), config.seed,
    )  # fmt: skip
    meter = SavedTensorMeter(backend.local_parameters(model))
    throughput = _Throughput(start)
    last_saved, step, early_stop = None, run.start_step, False
    run.callbacks.on_train_begin(_run_info(run))
    with StopRequest() as stop:
        try:
            for step in range(run.start_step + 1, run.total_steps + 1):
                window = _next_window(run, batches)
                meter.reset_peak()
                block_norms: list[float] = []
                step_block = functools.partial(_step_block, run, step, block_norms) if config.block_step else None
                with meter.active(), backend.autocast():
                    result = forward_backward(
                        model, window, config.backward, backend.backward, run.task_loss, backend.lm_head_context,
                        step_block,
                    )  # fmt: skip
                rates = run.scheduler.get_last_lr()  # the rates this step applies; the schedule moves on below
                if config.block_step:  # every block has stepped; the logged norm is the whole gradient's
                    grad_norm = math.sqrt(sum(norm**2 for norm in block_norms))
                    check_finite(result, grad_norm, step=step, step_taken=True)
                else:
                    check = functools.partial(check_finite, result, step=step)
                    grad_norm, block_norms = backend.step(model, run.optimizer, check)
                run.scheduler.step()
                run.losses.append(result.task_loss)
                run.peak_activation = max(run.peak_activation, meter.peak_bytes)
                throughput.add(distributed.all_reduce_sum(result.input_tokens, backend.device))
                run.callbacks.on_step_end(step, result.task_loss)
                stopping = distributed.any_process(stop.requested, backend.device)
                validation, improved = None, False
                if run.eval_examples is not None and (step % eval_steps(config) == 0 or step == run.total_steps):
                    validation, seconds = _validate(run, step)
                    throughput.exclude(seconds)
                    metric = {"eval_task_loss": validation.task_loss}[config.metric_for_best_model]  # SFT's choices
                    improved = run.best.update(metric, step, config.BEST_MODEL_METRICS[config.metric_for_best_model])
                    early_stop = run.best.since >= (config.early_stopping_patience or math.inf)
                logged = step % config.logging_steps == 0 or step == run.total_steps or stopping
                if run.main_process and (logged or validation is not None):
                    run.callbacks.on_log(
                        _step_metrics(run, step, result, rates, grad_norm, block_norms, meter, throughput, validation)
                    )
                periodic = config.save_steps > 0 and step % config.save_steps == 0
                # --load_best_model_at_end restores the best validation's weights: they must be on disk
                keep_best = improved and config.load_best_model_at_end
                if (periodic or stopping or keep_best) and step < run.total_steps:
                    last_saved = _save_checkpoint(run, step)
                if stopping and step < run.total_steps:
                    stop.exit_after_save(last_saved, step)
                if early_stop:
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


def _step_block(run: _Run, step: int, norms: list[float], block: int) -> None:
    """--block_step: block `block`'s optimizer step, right after its backward (forward_backward calls it)."""

    def check(norm: float) -> None:
        stop_unless_finite({f"gradient norm of block {block + 1}": norm}, step, step_taken=block > 0)

    norms.append(run.backend.step_block(run.block_parameters[block], run.optimizer, check))


def _tokenize_validation(config: SFTConfig, records: list[dict], tokenizer) -> list[dict]:
    with phase("tokenizing the validation data") as tokenizing:
        examples, stats = tokenize_sft(records, tokenizer, config.max_seq_length, config.prompt_format)
        tokenizing.result = (
            f"{plural(stats['examples'], 'example')}, {stats['trained_tokens']:,} trained tokens, "
            f"{stats['skipped_truncated']} skipped (answer truncated away)"
        )
    return examples


def _validate(run: _Run, step: int) -> tuple[EvalResult, float]:
    """The validation losses after `step` (every process takes part), and the seconds they took."""
    start = time.perf_counter()
    with run.backend.autocast():
        result = evaluate(run.model, _eval_batches(run), run.task_loss, run.backend.lm_head_context)
    run.backend.end_evaluation(run.model)
    losses = [result.task_loss, *result.aux_losses]
    if not all(math.isfinite(v) for v in losses):
        raise LoptError(
            f"The validation losses after step {step} are not finite ({', '.join(map(str, losses))}): the weights "
            "give NaN or infinite outputs on the validation records. Lower --learning_rate / --lr_k1, or use --bf16 "
            "instead of --fp16; the last checkpoint is kept."
        )
    return result, time.perf_counter() - start


def _eval_batches(run: _Run):
    """This process's validation batches (`eval_batches`), collated on its device, with whether each counts."""
    config, world, rank = run.config, distributed.world_size(), distributed.rank()
    for indices, counted in eval_batches(len(run.eval_examples), config.per_device_eval_batch_size, world, rank):
        batch = collate([run.eval_examples[i] for i in indices], run.tokenizer.pad_token_id)
        yield {k: v.to(run.backend.device) for k, v in batch.items()}, counted


def _step_metrics(
    run: _Run,
    step: int,
    result: StepResult,
    rates: list[float],
    grad_norm: float,
    block_norms: list[float] | None,
    meter: SavedTensorMeter,
    throughput: _Throughput,
    validation: EvalResult | None = None,
) -> StepMetrics:
    """The logged step as the metrics contract's record; `rates` are the learning rates the step used, `block_norms`
    each block's gradient norm before clipping (None: the backend cannot tell), `validation` the losses of a validation
    after it."""
    epoch, index = run.position
    return StepMetrics(
        step=step, epoch=round(epoch + index / run.batches_per_epoch, 4), task_loss=result.task_loss,
        aux_loss=result.aux_losses, lr=rates[-1], lr_k1=rates[0], grad_norm=grad_norm, block_grad_norm=block_norms,
        tokens_per_s=throughput.rate(), peak_mem_bytes=device_peak_bytes(run.backend.device),
        activation_peak_bytes=meter.peak_bytes, elapsed_s=throughput.elapsed(),
        eval_task_loss=validation.task_loss if validation else None,
        eval_aux_loss=validation.aux_losses if validation else None, recipe={"kl": result.terms.get("kl")},
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

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a validation's) out of the window: the rate is training's."""
        self.window_start += seconds

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
    if run.best.step == step:
        run.best.checkpoint = str(run.out / f"checkpoint-{step}")
    full = run.backend.full_state(run.model, run.optimizer)
    folder = distributed.broadcast_from_main(new_temp_folder(run.out) if run.main_process else None)
    run.backend.save_state(folder)
    saved = None
    if run.main_process:
        state = {
            "step": step, "position": run.position, "aux_heads": full.aux_heads, "optimizer": full.optimizer,
            "scheduler": run.scheduler.state_dict(), "rng": rng, "best": dataclasses.asdict(run.best),
            **run.backend.state_dict(),
        }  # fmt: skip
        saved = save_checkpoint(run.out, step, full.model, run.tokenizer, state, folder)
        prune_checkpoints(run.out, run.config.save_total_limit, run.best_checkpoint)
        run.callbacks.on_save(saved)
    distributed.barrier()
    return saved


def _finish(run: _Run) -> None:
    """The final model, a plain Hugging Face folder in --output_dir (gathered where sharded), with lopt's model
    card; uploaded with --push_to_hub."""
    best = _best_to_restore(run)
    if run.config.merge_lora and best is None:
        run.model.merge_adapters()
    final = _CheckpointModel(best, run.config, run.backend.device) if best else run.backend.full_state(run.model).model
    if run.main_process:
        with phase(f"saving the model to {run.out}" + (f" (the best validation's, {best.name})" if best else "")):
            save_final_model(run.out, final, run.tokenizer)
    distributed.barrier()
    if run.main_process:
        publish_run(run.config, run.out)


def _best_to_restore(run: _Run) -> Path | None:
    """The checkpoint whose weights --load_best_model_at_end makes the final model; None: the weights in memory
    (the last validation was the best, or there is none). The main process decides for all: gathering the weights
    in memory instead is a collective."""
    best = run.best_checkpoint if run.best.step != run.last_step else None
    if best is not None and run.main_process and not (best / TRAINING_STATE).is_file():
        logger.warning(
            "--load_best_model_at_end: the best validation's checkpoint %s is gone; the final model is the last "
            "weights (step %d) instead",
            best, run.last_step,
        )  # fmt: skip
        best = None
    return distributed.broadcast_from_main(best)


class _CheckpointModel:
    """A checkpoint's model saved as the final one (--load_best_model_at_end): its files as they are, or with
    --merge_lora an adapter checkpoint merged into its base model."""

    def __init__(self, folder: Path, config: SFTConfig, device: torch.device):
        self.folder, self.config, self.dtype = folder, config, weights_dtype(config, device)

    def save_pretrained(self, output_dir: Path, tokenizer=None) -> None:
        if self.config.merge_lora and is_adapter_folder(self.folder):
            # loads the base model the adapter names and merges the adapter in (on the CPU: the run is over)
            model, _ = load_model_and_tokenizer(
                str(self.folder), dtype=self.dtype, trust_remote_code=self.config.trust_remote_code
            )
            model.save_pretrained(output_dir, safe_serialization=True)
            tokenizer.save_pretrained(output_dir)
            return
        for path in self.folder.iterdir():  # the model and tokenizer files; not the optimizer's (subfolders)
            if path.is_file() and path.name != TRAINING_STATE:
                shutil.copy2(path, output_dir / path.name)


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
