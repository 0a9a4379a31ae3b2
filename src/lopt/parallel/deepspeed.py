"""DeepSpeed ZeRO (stages 1, 2, 3) under accelerate's DeepSpeed config, with local backward intact.

Why DeepSpeed's unmanaged gradient accumulation (`managed_gradient_accumulation: false`): local
backward calls backward() once per block, the early blocks' from inside the forward. In DeepSpeed's
default mode each engine.backward() is a micro-step and the optimizer boundary falls after a fixed
number of them, so with per-block backward a block's gradients were dropped or counted twice (seen
on ZeRO-2). Unmanaged, backward() only accumulates (ZeRO-2/3 reduce each block's gradients into the
owning process's partition as they arrive) and engine.step() is the boundary, whatever the number
of backward calls before it.

ZeRO-3 partitions every weight and gathers a module's weights only while that module runs. The
chunked loss reads the LM head's weight without calling the head (that is how it avoids the full
logits), so `gathered_lm_head` gathers that one weight around the task loss and its backward.

DeepSpeed averages gradients over processes; lopt's losses are already normalized by the global
token count (step.py), so each backward's loss is multiplied by the number of processes first.

Saving: the model is a plain Hugging Face folder as without DeepSpeed (gathered on the main process
under ZeRO-3). The optimizer state stays in DeepSpeed's own partitioned files, one per process, in
`checkpoint-N/deepspeed/`, so a checkpoint resumes under DeepSpeed with the same stage and number of
processes (training_state.pt records both and a mismatch is refused before training).
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from lopt.errors import LoptError, unsupported_setting
from lopt.models.local_learning import LocalLearningLM
from lopt.parallel import distributed
from lopt.parallel.backend import (
    FiniteCheck,
    FullState,
    ParallelBackend,
    StepSettings,
    refuse_unsharded_extras,
    split_full_weights,
)

ZERO_CONFIGS = "configs/accelerate_deepspeed_zero2.yaml or configs/accelerate_deepspeed_zero3.yaml"
ENGINE_FOLDER = "deepspeed"  # inside checkpoint-N/: DeepSpeed's partitioned optimizer state


@dataclass(frozen=True)
class ZeroSettings:
    stage: int  # 1: optimizer state partitioned; 2: + gradients; 3: + parameters


_refuse = functools.partial(unsupported_setting, see=ZERO_CONFIGS)


def zero_settings_from_environment(step: StepSettings) -> ZeroSettings | None:
    """What `accelerate launch` asks for: None (no DeepSpeed), ZeRO settings, or a LoptError."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() not in ("1", "true"):
        return None
    try:
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError as error:
        raise LoptError(
            f"The accelerate config asks for DeepSpeed, which cannot be imported here ({error}). Install "
            "it with `pip install 'lopt[deepspeed]'`, or launch with configs/accelerate_fsdp2.yaml."
        ) from error
    if not hasattr(DeepSpeedEngine, "managed_gradient_accumulation"):
        raise LoptError(
            f"DeepSpeed {deepspeed.__version__} lacks unmanaged gradient accumulation, which local backward "
            "needs (one backward per block); lopt is tested with 0.19.8. Run `pip install -U deepspeed`."
        )
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file:
        raise _refuse(
            "deepspeed_config_file",
            config_file,
            "lopt writes the DeepSpeed config itself, from its flags "
            "(--per_device_train_batch_size, --gradient_accumulation_steps, --max_grad_norm, --bf16) and "
            "the accelerate config's zero_stage.",
            "Remove deepspeed_config_file and set deepspeed_config: {zero_stage: 2}",
        )
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip()
    if stage not in ("1", "2", "3"):
        raise _refuse(
            "zero_stage",
            stage,
            "lopt runs ZeRO stages 1, 2 and 3 (stage 0 is plain data parallelism: "
            "use configs/accelerate_multi_gpu.yaml).",
            "Set zero_stage: 1, 2 or 3",
        )
    for what in ("optimizer", "param"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_DEVICE", "none").strip().lower()
        if device not in ("", "none"):
            raise _refuse(
                f"offload_{what}_device",
                device,
                "offloading is not verified with local backward (it needs a GPU, and lopt's tests run on CPU).",
                f"Set offload_{what}_device: none",
            )
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").strip().lower() in ("1", "true"):
        raise _refuse(
            "zero3_init_flag",
            "true",
            "every process loads the whole model, then DeepSpeed partitions it.",
            "Set zero3_init_flag: false",
        )
    accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accumulation and int(accumulation) != step.gradient_accumulation_steps:
        raise LoptError(
            f"gradient_accumulation_steps: {accumulation} in the accelerate config differs from "
            f"--gradient_accumulation_steps {step.gradient_accumulation_steps}. Remove it from the "
            "config (lopt's flag decides) or pass the same value."
        )
    clipping = os.environ.get("ACCELERATE_GRADIENT_CLIPPING")
    if clipping and float(clipping) != step.max_grad_norm:
        raise LoptError(
            f"gradient_clipping: {clipping} in the accelerate config differs from --max_grad_norm "
            f"{step.max_grad_norm}. Remove it from the config (lopt's flag decides) or pass the same value."
        )
    if step.fp16:
        raise LoptError(
            "--fp16 is not supported with DeepSpeed: its loss scaling is not verified with local backward. "
            "Use --bf16 (no loss scaling needed)."
        )
    return ZeroSettings(stage=int(stage))


def deepspeed_config(settings: ZeroSettings, step: StepSettings, dtype: torch.dtype) -> dict:
    return {
        "train_micro_batch_size_per_gpu": step.per_device_train_batch_size,
        "gradient_accumulation_steps": step.gradient_accumulation_steps,
        "managed_gradient_accumulation": False,  # see the module docstring
        "zero_optimization": {"stage": settings.stage},
        "gradient_clipping": step.max_grad_norm,  # 0 turns clipping off, as --max_grad_norm 0 does
        "bf16": {"enabled": dtype == torch.bfloat16},  # DeepSpeed then keeps float32 master weights
        "steps_per_print": 2**31 - 1,  # lopt reports progress itself
    }


def initialize(model: LocalLearningLM, optimizer: torch.optim.Optimizer, config: dict):
    """Partition `optimizer`'s state (and with stage 3 the model) across processes: DeepSpeed's engine.

    lopt keeps its own AdamW parameter groups and learning-rate schedule; DeepSpeed steps them.
    """
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config=config)
    mark_micro_batches(engine, model)
    return engine


def mark_micro_batches(engine, model: LocalLearningLM) -> None:
    """Tell DeepSpeed where each micro-batch's forward starts, as engine.forward() would.

    lopt runs the wrapper's `hidden_states`, not engine.forward(), so the call DeepSpeed makes there is
    made from a pre-hook on the embeddings, which run once at the start of every forward. Without it
    ZeRO-3 copies each micro-batch's reduced gradients over the previous ones instead of adding them
    (seen: the first micro-batch of a 2-micro-batch window lost).
    """
    model.parts.embeddings[0].register_forward_pre_hook(
        lambda module, args: engine.optimizer.clear_backward_seen_flag()
    )


def gathered_lm_head(model: LocalLearningLM):
    """A context in which the LM head's full weight is present (ZeRO-3 partitions it; see the module docstring)."""
    weight = model.parts.head.weight
    if not hasattr(weight, "ds_id"):  # ZeRO-1/2 keep whole weights on every process
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight])


class DeepSpeedBackend(ParallelBackend):
    """DeepSpeed's engine reduces, clips and steps; lopt's loop still runs forward, backward and the schedule.

    `extra_config` adds keys to the DeepSpeed config lopt writes (tests use it for a plain SGD optimizer).
    """

    def __init__(
        self, device: torch.device, settings: ZeroSettings, step: StepSettings, extra_config: dict | None = None
    ):
        super().__init__(device)
        self.settings, self.step_settings, self.extra_config = settings, step, extra_config or {}
        self.name = f"DeepSpeed ZeRO-{settings.stage}"
        refuse_unsharded_extras(step, self.name)
        if step.lopt is not None and step.lopt.clip_per_block:
            raise LoptError(
                f"--clip_per_block under {self.name}: DeepSpeed clips by the global norm inside its own step; launch "
                "with torchrun (data parallel) or the FSDP2 config, or drop --clip_per_block."
            )
        self.engine = self.model = None

    def prepare_optimizer(self, model: LocalLearningLM, optimizer: torch.optim.Optimizer) -> None:
        dtype = next(model.parameters()).dtype  # the weights' dtype decides DeepSpeed's bf16 mode
        config = {**deepspeed_config(self.settings, self.step_settings, dtype), **self.extra_config}
        self.engine, self.model = initialize(model, optimizer, config), model

    def backward(self, loss: torch.Tensor) -> None:
        # A loss normalized by a global count, scaled to the per-process share DeepSpeed averages.
        self.engine.backward(loss * distributed.world_size(), scale_wrt_gas=False)

    def lm_head_context(self):
        return gathered_lm_head(self.model)

    def step(self, model: LocalLearningLM, optimizer: torch.optim.Optimizer, check: FiniteCheck) -> tuple[float, None]:
        check(0.0, step_taken=False)  # the losses, before the step: DeepSpeed computes the norm inside its step
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else 0.0
        check(grad_norm, step_taken=True)
        return grad_norm, None  # the engine computes the global norm only

    def full_state(self, model: LocalLearningLM, optimizer: torch.optim.Optimizer | None = None) -> FullState:
        """The whole model (gathered under ZeRO-3); the optimizer state is saved by `save_state`."""
        if self.engine.zero_optimization_stage() < 3:
            return FullState(model, model.aux_heads.state_dict(), None)
        # The private method accelerate's get_state_dict uses too: gathers layer by layer onto the main process
        # (in the model's dtype despite the name); None elsewhere.
        weights = self.engine._zero3_consolidated_16bit_state_dict()
        return split_full_weights(model, weights or {}, None)

    def layout(self) -> dict:
        """What a checkpoint's DeepSpeed state fits: recorded in training_state.pt, checked on resume."""
        return {"zero_stage": self.engine.zero_optimization_stage(), "world_size": distributed.world_size()}

    def save_state(self, folder: Path) -> None:
        """Every process writes its optimizer partition into `folder`/deepspeed (a collective)."""
        self.engine.save_checkpoint(str(folder), tag=ENGINE_FOLDER, save_latest=False)
        distributed.barrier()

    def state_dict(self) -> dict:
        return {"scaler": None, "deepspeed": self.layout()}

    def load_state(
        self, checkpoint: Path, state: dict, model: LocalLearningLM, optimizer: torch.optim.Optimizer
    ) -> None:
        """Restore the optimizer partitions written by `save_state` (and DeepSpeed's copy of the weights)."""
        check_resumable(checkpoint, state.get("deepspeed"), self.layout())
        loaded, _ = self.engine.load_checkpoint(
            str(checkpoint), tag=ENGINE_FOLDER, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise LoptError(
                f"{checkpoint / ENGINE_FOLDER} could not be read by DeepSpeed (files missing?). Resume from "
                "another checkpoint ('latest' takes the newest complete one)."
            )

    def close(self) -> None:
        """Release the engine: its hooks are removed, and ZeRO-3's module stack lets go of the model (whose
        partitioned parameters hold their process group; see `release_module_stack`). The engine, its hooks
        and the model still reference each other: distributed.shutdown collects them."""
        engine, model = self.engine, self.model
        self.engine = self.model = None
        if engine is not None:
            engine.destroy()
            release_module_stack(model)


def release_module_stack(model: LocalLearningLM) -> None:
    """Take `model` and its submodules out of the stack ZeRO-3 keeps of the modules in forward (a module global of
    DeepSpeed's parameter_offload). DeepSpeed pushes the root module there when it partitions it and leaves it after
    engine.destroy() (0.19.8), and a layer recomputed by gradient checkpointing stays on it too: either keeps the
    model, and with its partitioned parameters the process groups, alive until the process exits."""
    from deepspeed.runtime.zero import parameter_offload

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        ours = {id(module) for module in model.modules()}
        stack[:] = [module for module in stack if id(module) not in ours]


def check_resumable(checkpoint: Path, saved: dict | None, now: dict | None) -> None:
    """Refuse, before training, a checkpoint whose optimizer state this launch cannot restore.

    `saved` and `now` are the DeepSpeed layouts of the checkpoint and of this launch (None: no DeepSpeed).
    """
    if saved == now:
        return
    if saved is None:
        raise LoptError(
            f"--resume_from_checkpoint {checkpoint} was saved without DeepSpeed, and this launch uses "
            "DeepSpeed. Resume it with the launcher it was saved with (torchrun or "
            "configs/accelerate_multi_gpu.yaml / configs/accelerate_fsdp2.yaml)."
        )
    if now is None:
        raise LoptError(
            f"--resume_from_checkpoint {checkpoint} holds DeepSpeed ZeRO-{saved['zero_stage']} optimizer "
            f"state from {saved['world_size']} processes. Resume it under DeepSpeed: `accelerate launch "
            f"--config_file configs/accelerate_deepspeed_zero{max(saved['zero_stage'], 2)}.yaml "
            f"--num_processes {saved['world_size']} -m lopt.cli sft ...` with zero_stage: {saved['zero_stage']}."
        )
    raise LoptError(
        f"--resume_from_checkpoint {checkpoint} holds DeepSpeed ZeRO-{saved['zero_stage']} optimizer state "
        f"from {saved['world_size']} processes; this launch is ZeRO-{now['zero_stage']} on "
        f"{now['world_size']}. Launch with zero_stage: {saved['zero_stage']} and --num_processes "
        f"{saved['world_size']}."
    )
