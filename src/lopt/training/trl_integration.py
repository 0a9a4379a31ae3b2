"""LoPT inside TRL's trainers: the pieces GRPO and DPO share.

TRL trains the plain Hugging Face model (`LocalLearningLM.model`). The wrapper's hooks sit on that
model's decoder layers, so every forward TRL runs already detaches hidden states at the block
boundaries; the wrapper itself stays outside TRL and holds the reconstruction heads. The mixin below
changes a TRL trainer at the narrowest hooks only, and never TRL's loss code:

- `compute_loss` runs TRL's own `compute_loss` inside `wrapper.boundary_step(...)`. With local
  backward each block's weighted local loss is back-propagated through `accelerator.backward` as
  soon as the block has run (its activations are freed before the next block runs); with joint
  backward the local losses are added to the loss TRL returns. Either way they are scaled exactly
  as TRL's loss is for gradient accumulation. Reference-model, old-log-prob and generation passes
  run without gradients, where the boundary hooks do nothing.
- `create_optimizer` uses lopt's `build_optimizer` (the `--lr_k1` groups, heads included).
- `_clip_grad_norm` clips over the model and the heads together, as the SFT loop does (LoPT:
  `training/optim.clip_gradients` over the blocks, by the global norm or, with --clip_per_block, each
  block by its own), and keeps each block's norm for `block_grad_norm`; after the optimizer step a
  callback zeroes the heads' gradients, as the Trainer does the model's.
- `training_step` counts the bytes saved for backward (`SavedTensorMeter`) for `metrics.jsonl`.
  With several processes (torchrun / accelerate launch) and LoPT, it runs TRL's step under
  `accelerator.no_sync`, so DistributedDataParallel never all-reduces, and at the end of each
  accumulation window (`accelerator.sync_gradients`) averages the gradients of the model and of the
  heads across processes itself: the mean DDP would have taken, before the trainer clips. E2E runs
  stay on DDP's own path. LoPT is data-parallel only: a sharding launch (FSDP, DeepSpeed) is refused.
- `_save_checkpoint` adds the heads to TRL's checkpoint folder (never to the model files) in
  `training_state.pt`, written last, after the folder is fsynced: it marks the checkpoint complete.
  It also applies `--save_total_limit`, counting complete checkpoints only.
- `_load_from_checkpoint` (resume) restores the heads next to the model; TRL's Trainer restores the
  optimizer, the schedule, the RNG states and the position in the data.
- `log` adds the metrics contract's fields TRL does not log itself (`lopt/lr`, `lopt/lr_k1`,
  `lopt/tokens_per_s`, `lopt/peak_mem_bytes`, `lopt/activation_peak_bytes`, `lopt/elapsed_s`) to TRL's
  logs of each logging step, next to `lopt/task_loss` and `lopt/aux_loss_block_<i>`. The Trainer hands
  those logs to every callback: the reporting integrations of `--report_to` (training/trackers.py) and
  `TRLBridge`, which writes metrics.jsonl from them, so both show the same values.
- As in the SFT loop, a NaN/inf loss stops the run before its optimizer step, and SIGINT / SIGTERM
  finish the step in flight, save a checkpoint and exit with 130 / 143 (`_StopOnSignal`).
- Validation (--eval_*) is TRL's own evaluation (`validation_arguments`: eval_strategy "steps",
  load_best_model_at_end, metric_for_best_model; transformers' EarlyStoppingCallback). `compute_loss`
  measures each block's local loss beside TRL's validation loss, and `TRLBridge` writes a validating
  step's metrics.jsonl row with the validation's values (eval_task_loss is TRL's eval_loss).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lopt.config import RunConfig, eval_steps, validates
from lopt.config.report_to import TRACKERS, parse_report_to
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.output import console, phase, plural
from lopt.parallel import distributed
from lopt.parallel.backend import adapters_sharded_error, optimizer_sharded_error
from lopt.parallel.distributed import all_reduce_gradients
from lopt.runs import write_training_args
from lopt.training.callbacks import Callback, Callbacks, MetricsFile, ProgressBar, RunInfo
from lopt.training.checkpoint import (
    TRAINING_STATE,
    check_writable,
    find_checkpoint,
    load_training_state,
    mark_complete,
    prune_checkpoints,
    save_final_model,
)
from lopt.training.memory import SavedTensorMeter, device_peak_bytes
from lopt.training.metrics import StepMetrics
from lopt.training.optim import build_optimizer, clip_gradients
from lopt.training.run import adapter_summary, prepare_output_dir, validation_summary
from lopt.training.signals import StopRequest
from lopt.training.step import stop_unless_finite
from lopt.training.trackers import (
    AUX_LOSS_KEY,
    BLOCK_GRAD_NORM_KEY,
    CONFIG_TEXT,
    config_text,
    import_tracker,
    lopt_key,
    start_wandb,
    tracker_names,
)

logger = logging.getLogger(__name__)

# Metric names in TRL's metrics dict (averaged over a logging window by TRL's `log`); AUX_LOSS_KEY (block i's
# local loss) comes from trackers.py, which names every contract field the same way in every recipe.
TASK_LOSS_KEY = lopt_key("task_loss")
# The contract's fields TRL does not log, added to its logs by LoptTrainerMixin.log (epoch and grad_norm
# are the Trainer's own; task and local losses go through TRL's metrics dict above).
WINDOW_FIELDS = ("lr", "lr_k1", "tokens_per_s", "peak_mem_bytes", "activation_peak_bytes", "elapsed_s")


class _ZeroHeadGradients(TrainerCallback):
    """After each optimizer step the Trainer zeroes the gradients of the model it trains only; the heads
    are outside that model, and would otherwise carry their gradients into the next step."""

    def __init__(self, heads: torch.nn.Module):
        self.heads = heads

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.heads.zero_grad(set_to_none=True)


class _StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during a TRL run: the Trainer finishes the optimizer step in flight, saves a
    checkpoint and stops (as the SFT loop does). Every process decides together, since a signal may
    reach one process first and saving is a collective."""

    def __init__(self, stop: StopRequest, device: torch.device):
        self.stop, self.device = stop, device
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_process(self.stop.requested, self.device) and state.global_step < state.max_steps:
            # the step in flight is logged and saved whatever --logging_steps / --save_steps say
            control.should_log = control.should_save = control.should_training_stop = self.stopped = True


class _ContractClock(TrainerCallback):
    """What the metrics contract needs from the Trainer's events: the learning rates of the last optimizer step
    (read before the Trainer steps the schedule), and where the logging window started (time, tokens)."""

    def __init__(self, meter: SavedTensorMeter):
        self.meter = meter
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = 0.0
        self.rates = [float("nan")]

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.meter.reset_peak()
        # GRPO counts tokens in the Trainer's state, which a resume restores: the first rate counts from
        # there (DPO counts its own from 0 each run, and leaves the state's count at 0)
        self.last_tokens = float(state.num_input_tokens_seen)

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        if lr_scheduler is not None:
            self.rates = lr_scheduler.get_last_lr()  # build_optimizer puts the early groups first

    def on_evaluate(self, args, state, control, **kwargs):
        # a validation runs right after its step's log (TRLBridge has the step logged): the next logging window
        # starts now, so tokens_per_s is training's
        self.last_time = time.perf_counter()

    def window(self, tokens: float | None, device: torch.device) -> dict[str, float]:
        """The logging window that ends now, as TRL log entries (WINDOW_FIELDS); the next one starts."""
        now = time.perf_counter()
        tokens = self.last_tokens if tokens is None else float(tokens)
        values = {
            "lr": self.rates[-1], "lr_k1": self.rates[0],
            "tokens_per_s": (tokens - self.last_tokens) / max(now - self.last_time, 1e-9),
            "peak_mem_bytes": device_peak_bytes(device), "activation_peak_bytes": self.meter.peak_bytes,
            "elapsed_s": now - self.start,
        }  # fmt: skip
        self.meter.reset_peak()
        self.last_time, self.last_tokens = now, tokens
        return {lopt_key(name): values[name] for name in WINDOW_FIELDS}


class LoptTrainerMixin:
    """Put before a TRL trainer class: ``class LoptGRPOTrainer(LoptTrainerMixin, GRPOTrainer)``."""

    def __init__(self, *args, lopt: LocalLearningLM, save_total_limit: int | None = None, **kwargs):
        self.lopt = lopt  # the wrapper, with LoPT's settings (`lopt.settings`, None for E2E)
        self.lopt_backward = lopt.backward_mode
        self.block_grad_norms: list[float] | None = None  # the last optimizer step's, block 1 first
        self.lopt_save_total_limit = save_total_limit
        self.saved_meter = SavedTensorMeter(lopt.parameters())
        self.last_task_loss = float("nan")  # the latest micro-batch's, for listeners' on_step_end
        super().__init__(*args, **kwargs)
        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if sharded and lopt.uses_adapters:
            raise adapters_sharded_error(self.accelerator.distributed_type.value)
        self.lopt_optim = getattr(self.args.optim, "value", self.args.optim)  # transformers keeps an enum member
        if sharded and self.lopt_optim != "adamw_torch":
            raise optimizer_sharded_error(self.lopt_optim, self.accelerator.distributed_type.value)
        if lopt.settings is not None and sharded:
            # training_step averages whole gradients across processes, which assumes every process
            # holds the whole model (data parallel); sharded gradients would be averaged wrongly.
            raise LoptError(
                f"LoPT inside TRL (lopt grpo / lopt dpo) trains data-parallel only, and the accelerate config asks "
                f"for {self.accelerator.distributed_type.value}. Launch with torchrun or a data-parallel accelerate "
                "config (configs/accelerate_multi_gpu.yaml)."
            )
        self.add_callback(_ZeroHeadGradients(lopt.aux_heads))
        self.lopt_clock = _ContractClock(self.saved_meter)
        self.add_callback(self.lopt_clock)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A training step's logs (not evaluation's, not the end-of-training summary, which have no task loss
        # pending) get the contract's remaining fields before TRL averages its metrics into them and the
        # Trainer hands them to the callbacks.
        pending = self._metrics["train"]
        if self.model.training and pending.get(TASK_LOSS_KEY):
            tokens = pending.get("num_tokens")  # TRL's running count of input tokens, all processes
            logs = {**logs, **self.lopt_clock.window(tokens[-1] if tokens else None, self.args.device)}
            for i, norm in enumerate(self.block_grad_norms or []):  # as grad_norm: the window's last step's
                logs[BLOCK_GRAD_NORM_KEY.format(i + 1)] = norm
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training:  # validation: TRL's loss as it is, each block's local loss measured beside it
            with self.lopt.boundary_step(None, 0.0, measure=True) as aux_losses:
                output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # the policy's forward runs first; a reference pass through the same layers (LoRA disabled) adds more.
            # Averaged over the processes, as TRL's own validation metrics are (every process runs as many batches).
            for i, aux in enumerate(aux_losses[: len(self.lopt.aux_heads)]):
                mean = self.accelerator.gather(aux.detach().reshape(1)).mean()
                self._metrics["eval"][AUX_LOSS_KEY.format(i + 1)].append(float(mean))
            return output
        if not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        blocks = self.lopt.num_blocks
        block_weight = self.lopt.lambda_aux / max(blocks - 1, 1)
        # Trainer.training_step divides the returned loss by the accumulation steps unless the trainer
        # says it already did (`loss_is_scaled_for_ga`: GRPO yes, DPO no); either way, what reaches
        # `accelerator.backward` is a micro-batch's loss / accumulation steps, and so are the local losses.
        local = self.lopt_backward == "local"
        backward_fn = self.accelerator.backward if local else None
        with self.lopt.boundary_step(
            backward_fn, block_weight / self.current_gradient_accumulation_steps
        ) as aux_losses:
            output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = output[0] if return_outputs else output
        returned_scale = self.current_gradient_accumulation_steps if self.loss_is_scaled_for_ga else 1
        values = {"task loss": float(loss.detach()) * returned_scale}
        values.update({f"aux loss (block {i + 1})": float(aux.detach()) for i, aux in enumerate(aux_losses)})
        self._stop_unless_finite(values)
        metrics = self._metrics["train"]
        metrics[TASK_LOSS_KEY].append(values["task loss"])
        self.last_task_loss = values["task loss"]
        for i in range(len(aux_losses)):
            metrics[AUX_LOSS_KEY.format(i + 1)].append(values[f"aux loss (block {i + 1})"])
        if not local and aux_losses:
            loss = loss + block_weight / returned_scale * torch.stack(aux_losses).sum()
        return (loss, output[1]) if return_outputs else loss

    def _stop_unless_finite(self, values: dict[str, float]) -> None:
        """Stop the run before the optimizer step that would apply a NaN/inf loss's gradients (the
        Trainer only filters them out of its logs). Every process stops, not only the one that saw it:
        the others would wait for it forever in the next gradient all-reduce."""
        bad_here = not all(math.isfinite(v) for v in values.values())
        if distributed.any_process(bad_here, self.args.device) and not bad_here:
            values = {"loss on another process": float("nan")}
        stop_unless_finite(values, self.state.global_step + 1)

    def training_step(self, model, inputs, num_items_in_batch=None):
        lopt = self.lopt.settings is not None
        # DistributedDataParallel expects one backward per forward and all-reduces during it; local
        # backward runs one per block, and the heads are not in DDP's module at all. So for LoPT DDP
        # never syncs, and the gradients are averaged below instead (a no-op on one process).
        sync = self.accelerator.no_sync(model) if lopt else nullcontext()
        with self.saved_meter.active(), sync:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if lopt and self.accelerator.sync_gradients:  # the window's last micro-batch: the trainer clips next
            params = [p for p in self.lopt.parameters() if p.requires_grad]
            all_reduce_gradients(params, mean=True)
        return loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                self.lopt, self.args.learning_rate, weight_decay=self.args.weight_decay, optim=self.lopt_optim
            )
        return self.optimizer

    def _clip_grad_norm(self, model):
        if self.lopt.settings is None:  # E2E: accelerate's clip, which FSDP and DeepSpeed need; one block's norm
            norm = self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
            self.block_grad_norms = None if norm is None else [float(norm)]
            return norm
        # LoPT (data-parallel, gradients averaged in training_step): the SFT loop's clip over the blocks, the heads
        # (outside the model TRL trains) with theirs; fp16's loss scale comes off first, as accelerate's clip does.
        self.accelerator.unscale_gradients()
        self.block_grad_norms = clip_gradients(
            self.lopt.block_parameters(), self.args.max_grad_norm, self.lopt.settings.clip_per_block
        )
        return torch.tensor(math.hypot(*self.block_grad_norms))

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            # A run resumed from an earlier checkpoint saves over the folders it re-reaches: the old
            # marker goes first, so the folder does not pass for complete while it is rewritten.
            (folder / TRAINING_STATE).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every process has written its RNG state into the folder
        if self.args.should_save:
            mark_complete(folder, {"step": self.state.global_step, "aux_heads": self.lopt.aux_heads.state_dict()})
            # the checkpoint --load_best_model_at_end restores is kept (the Trainer recorded it while saving)
            best = self.state.best_model_checkpoint if self.args.load_best_model_at_end else None
            prune_checkpoints(folder.parent, self.lopt_save_total_limit, Path(best) if best else None)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.lopt.aux_heads.load_state_dict(load_training_state(Path(resume_from_checkpoint))["aux_heads"])


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


class TRLBridge(TrainerCallback):
    """TRL's TrainerCallback events -> lopt's listeners (training/callbacks.py), with each logged step as
    the StepMetrics record of the metrics contract (training/metrics.py), read from TRL's logs.

    `recipe` is the recipe's record (recipes/registry.py): its own metrics.jsonl columns, each with the key of
    TRL's logs it comes from, and its validation columns. The mixin's `log` has put the other fields in the logs
    (`_ContractClock`): `activation_peak_bytes` is the peak of bytes saved for backward over the logging window;
    `lr` and `lr_k1` are the rates of the last optimizer step. Only the main process tells the listeners.

    A step that validates is always logged: the Trainer logs the training values first, then validates, so
    that step's row waits for the validation (`on_evaluate`) and holds its values too.
    """

    def __init__(self, trainer, recipe, listeners: list[Callback]):
        self.trainer, self.recipe, self.columns = trainer, recipe, recipe.trl_keys()
        self.callbacks = Callbacks(listeners)
        self.pending: StepMetrics | None = None  # a validating step's row, until the validation's values come

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            lopt = self.trainer.lopt
            self.callbacks.on_train_begin(
                RunInfo(
                    recipe=self.recipe.name, method="lopt" if lopt.num_blocks > 1 else "e2e", blocks=list(lopt.blocks),
                    backward=self.trainer.lopt_backward, total_steps=state.max_steps, start_step=state.global_step,
                    output_dir=Path(args.output_dir), world_size=self.trainer.accelerator.num_processes,
                )
            )  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            control.should_log = True  # on every process: the Trainer's logging gathers the loss across them
        if state.is_world_process_zero:
            self.callbacks.on_step_end(state.global_step, self.trainer.last_task_loss)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or TASK_LOSS_KEY not in logs:
            return  # the end-of-training summary and evaluation logs carry no step metrics
        self._flush()  # a row still waiting for a validation that did not come
        window = {name: logs[lopt_key(name)] for name in WINDOW_FIELDS}
        blocks = range(1, len(self.trainer.lopt.aux_heads) + 1)
        row = StepMetrics(
            step=state.global_step, epoch=logs.get("epoch"), task_loss=logs[TASK_LOSS_KEY],
            aux_loss=[logs.get(AUX_LOSS_KEY.format(i)) for i in blocks], grad_norm=logs.get("grad_norm"), **window,
            block_grad_norm=_block_grad_norms(logs),
            recipe={column: logs.get(key) for column, key in self.columns.items()}
            | dict.fromkeys(self.recipe.eval_columns),
        )  # fmt: skip
        self.pending = row
        if not control.should_evaluate:
            self._flush()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        row, self.pending = self.pending, None
        if row is None:
            return  # not the main process
        blocks = range(1, len(self.trainer.lopt.aux_heads) + 1)
        row.eval_task_loss = metrics.get("eval_loss")
        row.eval_aux_loss = [metrics.get("eval_" + AUX_LOSS_KEY.format(i)) for i in blocks]
        for column in self.recipe.eval_columns:
            row.recipe[column] = metrics.get(trl_metric(column, self.columns))
        self.callbacks.on_log(row)

    def _flush(self) -> None:
        if self.pending is not None:
            row, self.pending = self.pending, None
            self.callbacks.on_log(row)

    def on_save(self, args, state, control, **kwargs):
        # The mixin's _save_checkpoint has completed the folder (training_state.pt written last) by now.
        if state.is_world_process_zero:
            self.callbacks.on_save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._flush()  # a row whose validation never came (the run failed in it)
            self.callbacks.on_train_end(state.global_step)


def _block_grad_norms(logs: dict) -> list[float] | None:
    """The logged step's per-block gradient norms (LoptTrainerMixin.log put them there); None where not clipped."""
    norms = []
    while BLOCK_GRAD_NORM_KEY.format(len(norms) + 1) in logs:
        norms.append(logs[BLOCK_GRAD_NORM_KEY.format(len(norms) + 1)])
    return norms or None


def pair_datasets(records: list[dict], eval_records: list[dict] | None) -> dict:
    """The train_dataset / eval_dataset arguments of a TRL preference trainer (DPO, reward model)."""
    import datasets

    return {
        "train_dataset": datasets.Dataset.from_list(records),
        "eval_dataset": datasets.Dataset.from_list(eval_records) if eval_records is not None else None,
    }


def build_lopt_trainer(trainer_class, config: RunConfig, wrapper: LocalLearningLM, args, **trl_kwargs):
    """`trainer_class` (a TRL trainer with LoptTrainerMixin) on `wrapper`'s model with lopt's flags; `trl_kwargs` are
    the trainer's own arguments (datasets, tokenizer, rewards). TRL's refusal of the settings or data becomes a
    LoptError that quotes it; a dataset TRL's filters left empty (every record longer than the length limits) is
    refused by name."""
    try:
        trainer = trainer_class(
            model=wrapper.model, args=args, lopt=wrapper, save_total_limit=config.save_total_limit, **trl_kwargs
        )
    except (ValueError, ImportError, TypeError) as error:  # TRL's checks of the settings and the data
        trl_name = next(c.__name__ for c in trainer_class.__mro__[1:] if c.__module__.startswith("trl."))
        raise LoptError(f"TRL's {trl_name} rejected these settings or data: {error}") from error
    for data, what in ((trainer.train_dataset, "train on"), (trainer.eval_dataset, "validate on")):
        if data is not None and len(data) == 0:
            raise LoptError(
                f"TRL left out every record as too long for the length limits, so none is left to {what}; raise "
                "--max_seq_length (or --max_prompt_length)."
            )
    return trainer


def add_lopt_callbacks(trainer, recipe, append: bool, listeners: Sequence[Callback] = ()) -> None:
    """Write metrics.jsonl (a resumed run appends) and tell `listeners`, through one TRLBridge. lopt's progress
    (its bar or log lines, or a listener that draws progress itself: the dashboard) replaces the Trainer's
    console bar and log dicts, so every recipe shows the same progress and fields."""
    for console_logger in (ProgressCallback, PrinterCallback):  # the Trainer adds one, as its verbosity says
        trainer.remove_callback(console_logger)
    drawn = any(listener.draws_progress for listener in listeners)
    progress = [] if drawn or not trainer.is_world_process_zero() else [ProgressBar(console)]
    trainer.add_callback(TRLBridge(trainer, recipe, [*progress, MetricsFile(append=append), *listeners]))


@contextmanager
def trl_reporting(trainer, config: RunConfig):
    """Around `trainer.train()` of a run whose TRL arguments came from `trl_arguments`, on the main process:
    start wandb in `<output_dir>/wandb/`, offline unless WANDB_MODE says otherwise (transformers'
    WandbCallback would start it in ./wandb, online, and leave it open), and finish it after; and add lopt's
    config to each tracker's once transformers' integrations have started them (`_LoptConfig`)."""
    names = [name for name in trainer.args.report_to if name in TRACKERS]
    if not names or not trainer.is_world_process_zero():
        yield
        return
    trainer.add_callback(_LoptConfig(trainer, config.to_json(), names))
    wandb_run = None
    if "wandb" in names:
        wandb = import_tracker("wandb")
        if wandb.run is None:  # a run the user started stays theirs, as with transformers
            wandb_run = start_wandb(wandb, Path(trainer.args.output_dir), trainer.args.project, trainer.args.run_name)
    try:
        yield
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    if wandb_run is not None:
        wandb_run.finish()


class _LoptConfig(TrainerCallback):
    """Adds lopt's run config to the trackers that transformers' integrations start in their on_train_begin
    (added after them, this callback runs after them); lopt's values win over TRL's arguments of the same name."""

    def __init__(self, trainer, values: dict, names: list[str]):
        self.trainer, self.values, self.names = trainer, values, names

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if "wandb" in self.names and import_tracker("wandb").run is not None:
            import_tracker("wandb").run.config.update(self.values, allow_val_change=True)
        if "trackio" in self.names:
            import_tracker("trackio").config.update(self.values)  # the run TrackioCallback just started
        if "tensorboard" in self.names:
            from transformers.integrations import TensorBoardCallback

            for callback in self.trainer.callback_handler.callbacks:
                if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                    callback.tb_writer.add_text(CONFIG_TEXT, config_text(self.values), state.global_step)


@dataclass
class TRLRunResult:
    output_dir: Path
    steps: int
    metrics: list[dict]  # metrics.jsonl: one object per logged step
    elapsed_s: float

    @property
    def first_loss(self) -> float | None:
        return self.metrics[0]["task_loss"] if self.metrics else None

    @property
    def last_loss(self) -> float | None:
        return self.metrics[-1]["task_loss"] if self.metrics else None


def run_trl_recipe(
    recipe, config: RunConfig, build_trainer: Callable, describe: Callable, callbacks: Sequence[Callback] = ()
) -> TRLRunResult:
    """A run of a TRL recipe (`recipe`, its registry record): `build_trainer(config, out, callbacks)` makes the
    trainer, `describe(trainer)` the recipe's part of the start-up line; the rest (processes, output folder, resume,
    training, final model) is shared. `callbacks` listen next to metrics.jsonl, and hear `on_model_saved` once the
    final model is complete. Only the main process writes the run's files."""
    # Join torchrun's process group before anything is written (accelerate then uses this group),
    # so that only the main process checks and creates the output folder.
    distributed.init_from_environment()
    main_process = distributed.is_main_process()
    out = prepare_output_dir(config) if main_process else Path(config.output_dir)
    distributed.barrier()
    resume_dir = find_checkpoint(out, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    trainer = build_trainer(config, out, callbacks)
    wrapper = trainer.lopt
    if main_process:
        check_writable(out, wrapper)
        write_training_args(out, recipe.name, config.to_json())
        console.print(
            f"[bold]lopt {recipe.name}[/]: {config.canonical_method}"
            + (f" k={wrapper.num_blocks}, {config.backward} backward" if wrapper.num_blocks > 1 else "")
            + (" | each block clipped by its own gradient norm" if config.clip_per_block else "")
            + adapter_summary(config, wrapper)
            + f" | {describe(trainer)} | {plural(trainer.accelerator.num_processes, 'process', 'processes')}"
            + f", device {trainer.args.device}"
            + (f" | resuming from {resume_dir}" if resume_dir else "")
        )
    start = time.perf_counter()
    with StopRequest() as stop, trl_reporting(trainer, config):
        stopper = _StopOnSignal(stop, trainer.args.device)
        trainer.add_callback(stopper)
        if config.early_stopping_patience:
            trainer.add_callback(EarlyStoppingCallback(config.early_stopping_patience))
        # TRL's Trainer restores the model (and, through the mixin, the heads), the optimizer, the
        # schedule, the RNG states and the position in the data.
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    if stopper.stopped:
        distributed.barrier()
        stop.exit_after_save(find_checkpoint(out, "latest"), trainer.state.global_step)
    state = trainer.state
    # validated, with checkpoints: the Trainer has recorded the best step (older transformers releases do not)
    if main_process and getattr(state, "best_global_step", None) is not None:
        restored = state.best_model_checkpoint if config.load_best_model_at_end else None
        summary = validation_summary(
            config, state.best_global_step, state.best_metric, state.global_step, state.max_steps,
            Path(restored).name if restored and state.best_global_step != state.global_step else None,
        )  # fmt: skip
        console.print(summary, highlight=False)
    if main_process:
        if config.merge_lora:
            wrapper.merge_adapters()
        with phase(f"saving the model to {out}"):
            save_final_model(out, wrapper, trainer.processing_class)
    distributed.barrier()
    if main_process:  # e.g. publishing: lopt's card replaces the one TRL writes with each checkpoint
        Callbacks(list(callbacks)).on_model_saved(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return TRLRunResult(out, trainer.state.global_step, metrics, time.perf_counter() - start)
