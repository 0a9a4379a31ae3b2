"""LoptTrainerMixin: LoPT inside a TRL trainer at its narrowest hooks (loss, step, optimizer, clipping,
checkpoints, logs); the package's docstring says what each hook does."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback

from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.parallel import distributed
from lopt.parallel.backend import adapters_sharded_error, optimizer_sharded_error
from lopt.parallel.distributed import all_reduce_gradients
from lopt.training.checkpoint import (
    TRAINING_STATE,
    load_training_state,
    mark_complete,
    prune_checkpoints,
)
from lopt.training.memory import SavedTensorMeter, device_peak_bytes
from lopt.training.optim import build_optimizer, clip_gradients
from lopt.training.step import stop_unless_finite
from lopt.training.trackers import (
    AUX_LOSS_KEY,
    BLOCK_GRAD_NORM_KEY,
    lopt_key,
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
