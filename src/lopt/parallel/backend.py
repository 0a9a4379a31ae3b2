"""The parallel backend interface: everything the training loop asks of how a model is spread over processes.

Three backends implement it: replicated (one process, or data parallel with an explicit gradient sum:
replicated.py), FSDP2 (fsdp.py) and DeepSpeed ZeRO 1/2/3 (deepspeed.py); `backend_from_environment`
in launch.py picks one from what `torchrun` / `accelerate launch` set. The SFT loop calls only the
methods below, in this order, and never names a backend:

    prepare_model -> (optimizer built) -> prepare_optimizer -> [load_state on resume]
    per step: autocast { forward_backward(backward=..., lm_head_context=...) } -> step
    per validation: autocast { evaluate(lm_head_context=...) } -> end_evaluation
    per checkpoint: full_state, save_state, state_dict        at the end: full_state, close
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM, LoptSettings

# check(grad_norm, step_taken=...): raises before (or, with step_taken, right after) a step on non-finite values
FiniteCheck = Callable[[float, bool], None]


@dataclass(frozen=True)
class StepSettings:
    """What a backend takes from the run's flags: how to clip and step (fp16's loss scaling), the batch shape the
    DeepSpeed config repeats, and what the sharded backends refuse (adapters, 8-bit state, the KL reference model, and
    LoPT's block steps). `of(config)` reads them from an SFT config."""

    max_grad_norm: float = 1.0  # 0: no clipping
    fp16: bool = False
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    use_peft: bool = False
    optim: str = "adamw_torch"
    kl_beta: float = 0.0
    lopt: LoptSettings | None = None  # LoPT's backward, clip_per_block and block_step; None for E2E

    @classmethod
    def of(cls, config) -> StepSettings:
        return cls(
            max_grad_norm=config.max_grad_norm, fp16=config.fp16,
            per_device_train_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, use_peft=config.use_peft,
            optim=config.optim, kl_beta=config.kl_beta, lopt=config.lopt,
        )  # fmt: skip


class ParallelBackend:
    """Hooks with a default do nothing unless a backend needs them; the others each backend implements."""

    name = "replicated"  # shown at start-up and told to listeners: replicated, FSDP2, DeepSpeed ZeRO-n

    def __init__(self, device: torch.device):
        self.device = device

    def prepare_model(self, model: LocalLearningLM) -> None:
        """Called once the model (with any resumed heads) is loaded, before the optimizer exists."""

    def prepare_optimizer(self, model: LocalLearningLM, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimizer exists (DeepSpeed partitions its state here)."""

    def autocast(self) -> AbstractContextManager:
        """Entered around each step's forward and backward (fp16 autocast where it applies)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one loss (each block's local loss, then the task loss) into the gradients."""
        raise NotImplementedError

    def lm_head_context(self) -> AbstractContextManager:
        """Entered around the task loss and its backward (ZeRO-3 gathers the LM head there)."""
        return nullcontext()

    def end_evaluation(self, model: LocalLearningLM) -> None:
        """After a validation's forwards, which run no backward (FSDP2 reshards what they left gathered)."""

    def step(
        self, model: LocalLearningLM, optimizer: torch.optim.Optimizer, check: FiniteCheck
    ) -> tuple[float, list[float] | None]:
        """Reduce the window's gradients over processes, clip (by the global norm, or with --clip_per_block each
        block by its own), `check`, apply, zero. Return the global gradient norm before clipping and each block's
        (`LocalLearningLM.block_parameters`), or None where the backend cannot tell them (DeepSpeed)."""
        raise NotImplementedError

    def step_block(
        self, parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, check: Callable[[float], None]
    ) -> float:
        """--block_step: `step` for one block's `parameters` (clipped by their own norm), right after the block's
        backward; their gradients are freed. Only the replicated backend has it: the sharded ones refuse the flag
        when they are made (`refuse_unsharded_extras`)."""
        raise NotImplementedError

    def local_parameters(self, model: LocalLearningLM) -> list[torch.Tensor]:
        """This process's parameter tensors (shards, where sharded): excluded from the activation meter."""
        return list(model.parameters())

    def full_state(self, model: LocalLearningLM, optimizer: torch.optim.Optimizer | None = None) -> FullState:
        """What a checkpoint (or, without optimizer, the final model) holds. Every process calls it: a collective."""
        raise NotImplementedError

    def save_state(self, folder: Path) -> None:
        """Write the backend's own files into the checkpoint `folder` being built (every process calls it)."""

    def state_dict(self) -> dict:
        """What training_state.pt records about the backend: `scaler` (fp16) and `deepspeed` (its layout)."""
        raise NotImplementedError

    def load_state(
        self, checkpoint: Path, state: dict, model: LocalLearningLM, optimizer: torch.optim.Optimizer
    ) -> None:
        """Resume: refuse a checkpoint this launch cannot restore, then restore the optimizer (and scaler)."""
        raise NotImplementedError

    def close(self) -> None:
        """After the run, also when it failed: release what the backend holds that would keep the model, and with
        it the process group, alive once the run's own references are gone (DeepSpeed's engine). The model is not
        trained further. See distributed.shutdown for why the process group must go before the process exits."""


def adapters_sharded_error(backend_name: str) -> LoptError:
    return LoptError(
        f"--use_peft under {backend_name}: lopt's adapter checkpoints are not shard-aware, and sharding a frozen base "
        "with small adapters saves little; launch with torchrun (data parallel, configs/accelerate_multi_gpu.yaml), "
        "or train without --use_peft under this config."
    )


def optimizer_sharded_error(optim: str, backend_name: str) -> LoptError:
    return LoptError(
        f"--optim {optim} under {backend_name}: bitsandbytes quantizes each parameter's state whole, and the sharded "
        "backends hand the optimizer shards (FSDP2's DTensors, ZeRO's flat partitions); launch with torchrun (data "
        "parallel), or use --optim adamw_torch under this config."
    )


def refuse_unsharded_extras(settings: StepSettings, backend_name: str) -> None:
    """What the sharded backends (FSDP2, ZeRO) refuse at construction: LoRA adapters, 8-bit optimizer state, block
    steps and the KL reference model are data-parallel only (the replicated backend, torchrun)."""
    if settings.use_peft:
        raise adapters_sharded_error(backend_name)
    if settings.optim != "adamw_torch":
        raise optimizer_sharded_error(settings.optim, backend_name)
    if settings.lopt is not None and settings.lopt.block_step:
        raise LoptError(
            f"--block_step under {backend_name}: a block's step would need its sharded gradients reduced and its "
            "optimizer shard stepped on its own; launch with torchrun (data parallel), or drop --block_step."
        )
    if settings.kl_beta > 0:
        raise LoptError(
            f"--kl_beta under {backend_name}: the frozen starting model would be a full unsharded copy on every "
            "process, which defeats the sharding; launch with torchrun (data parallel), where --use_peft makes the "
            "reference the base model with the adapters disabled, at no extra weights."
        )


class GatheredModel:
    """Full weights gathered from a sharded model, saved like `LocalLearningLM.save_pretrained`."""

    def __init__(self, model: LocalLearningLM, weights: dict[str, torch.Tensor]):
        self.model, self._weights = model.model, weights

    def save_pretrained(self, output_dir, tokenizer=None) -> None:
        self.model.save_pretrained(output_dir, state_dict=self._weights, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)


@dataclass
class FullState:
    """What a checkpoint holds, complete on the main process (other processes may hold nothing)."""

    model: LocalLearningLM | GatheredModel  # saved with .save_pretrained(folder, tokenizer)
    aux_heads: dict[str, torch.Tensor]
    optimizer: dict | None


def split_full_weights(model: LocalLearningLM, weights: dict[str, torch.Tensor], optimizer: dict | None) -> FullState:
    """A FullState from the wrapper's gathered state dict: the HF model's weights and the heads' apart."""
    heads = {k.removeprefix("aux_heads."): v for k, v in weights.items() if k.startswith("aux_heads.")}
    hf = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    return FullState(GatheredModel(model, hf), heads, optimizer)
