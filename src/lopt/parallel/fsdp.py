"""Fully sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`) under accelerate's FSDP2 config.

Why these FSDP units, with local backward running one `backward()` per block *inside* the forward:
- Every decoder layer and every reconstruction head is its own unit, so a block's backward all-gathers
  and reduce-scatters only that block's layers and head.
- After each of those backward calls FSDP's end-of-backward callback reduce-scatters and reshards
  every unit, including those of blocks the forward has not reached yet (a no-op for them). A unit
  used on both sides of a block boundary would be resharded under the running forward, so the
  embeddings (used by block 1 only) are a unit of their own.
- The final norm and the LM head are one unit that stays gathered from the norm's forward until the
  task loss's backward: the chunked loss reads `lm_head.weight` directly instead of calling the head.
  Tied embeddings (end-to-end runs; LoPT unties them) share that unit, since FSDP cannot split a
  shared parameter between units.
- The wrapper is the root, with `hidden_states` registered as a forward method, so FSDP sees one
  forward per micro-batch.

Losses are already normalized by the global token count (step.py), so gradients are summed across
processes, not averaged: every unit reduces with a divide factor of 1.

A validation runs the same forward without a backward, so the units it leaves gathered (the final norm
and LM head) are resharded after it (`reshard`): the optimizer and saving expect every parameter sharded.

Saving gathers full tensors to the main process (plain Hugging Face folders, as without FSDP), and
checkpoints hold the full optimizer state keyed by parameter name, so a run can resume on any number
of processes, sharded or not.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh

try:  # FSDP2's public API; lopt's unsharded training also runs on torch releases without it
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor
except ImportError:
    FSDPModule = DTensor = None

from lopt.errors import LoptError, unsupported_setting
from lopt.models.local_learning import LocalLearningLM
from lopt.parallel import distributed
from lopt.parallel.backend import FullState, StepSettings, refuse_unsharded_extras, split_full_weights
from lopt.parallel.replicated import ReplicatedBackend

FSDP2_CONFIG = "configs/accelerate_fsdp2.yaml"
# The release this path is tested with: it relies on fully_shard's handling of a unit whose module
# never runs forward (the LM head) and of several backward calls per forward.
TESTED_TORCH = (2, 13)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_meshes: list[weakref.ref] = []  # the device meshes shard_model made, for release_process_groups


@dataclass(frozen=True)
class FSDPSettings:
    """The settings of accelerate's FSDP2 config that lopt honours."""

    reshard_after_forward: bool = True  # False: keep each layer gathered from its forward to its backward
    activation_checkpointing: bool = False  # same as --gradient_checkpointing


def _flag(name: str, default: str) -> bool:
    value = os.environ.get(name, default).strip().lower()
    if value not in _TRUE + _FALSE:
        setting = name.lower() if name.startswith("FSDP_") else "distributed_type"
        raise LoptError(
            f"{name}={value!r} (set by accelerate launch from the config's {setting}) is not a boolean "
            "as FSDP2 expects; set it to true or false."
        )
    return value in _TRUE


_refuse = functools.partial(unsupported_setting, see=FSDP2_CONFIG)


def fsdp_settings_from_environment(step: StepSettings) -> FSDPSettings | None:
    """What `accelerate launch` asks for: None (no FSDP), FSDP2 settings, or a LoptError.

    FSDP1 is refused rather than ignored: running replicated under a sharding config would silently
    use far more memory than asked (DeepSpeed is read by deepspeed.py). FSDP1-only
    settings that accelerate itself ignores under FSDP2 (sharding strategy, prefetch, use_orig_params,
    sync_module_states) are ignored here too.
    """
    if not _flag("ACCELERATE_USE_FSDP", "false"):
        return None
    installed = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if FSDPModule is None or installed < TESTED_TORCH:
        raise LoptError(
            f"FSDP in lopt needs torch >= {'.'.join(map(str, TESTED_TORCH))} (the release it is tested with); this "
            f"is torch {torch.__version__}. Upgrade torch (pip install -U torch) or launch without FSDP "
            "(configs/accelerate_multi_gpu.yaml)."
        )
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise _refuse(
            "fsdp_version",
            version,
            "lopt shards with FSDP2 (fully_shard), which allows local backward's one backward per block.",
            "Set fsdp_version: 2",
        )
    wrap = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if wrap.upper() != "TRANSFORMER_BASED_WRAP":
        raise _refuse(
            "fsdp_auto_wrap_policy",
            wrap,
            "lopt always shards each decoder layer, each reconstruction "
            "head, the embeddings and the LM head as FSDP units.",
            "Set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP or leave it out",
        )
    state_dict_type = os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    if state_dict_type.upper() != "FULL_STATE_DICT":
        raise _refuse(
            "fsdp_state_dict_type",
            state_dict_type,
            "checkpoints and the final model are plain Hugging Face folders, gathered on the main process.",
            "Set fsdp_state_dict_type: FULL_STATE_DICT",
        )
    if _flag("FSDP_OFFLOAD_PARAMS", "false"):
        raise _refuse(
            "fsdp_offload_params",
            "true",
            "CPU offload is not verified with local backward (it needs a GPU, and lopt's tests run on CPU).",
            "Set fsdp_offload_params: false",
        )
    if _flag("FSDP_CPU_RAM_EFFICIENT_LOADING", "false"):
        raise _refuse(
            "fsdp_cpu_ram_efficient_loading",
            "true",
            "every process loads the whole model before sharding it.",
            "Set fsdp_cpu_ram_efficient_loading: false",
        )
    if os.environ.get("FSDP_IGNORED_MODULES"):
        raise _refuse(
            "fsdp_ignored_modules",
            os.environ["FSDP_IGNORED_MODULES"],
            "every parameter is sharded.",
            "Remove the setting",
        )
    if step.lopt is not None and step.lopt.backward != "local":
        raise LoptError(
            f"--backward {step.lopt.backward} is not supported with FSDP: its single backward reaches each "
            "block's last layer through the local loss only, after FSDP has freed that layer's gathered "
            "weights. Use --backward local (the default; same gradients)."
        )
    if step.fp16:
        raise LoptError(
            "--fp16 is not supported with FSDP: its loss scaler is not verified on sharded gradients. "
            "Use --bf16 (no loss scaling needed)."
        )
    return FSDPSettings(
        reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        activation_checkpointing=_flag("FSDP_ACTIVATION_CHECKPOINTING", "false"),
    )


def shard_model(model: LocalLearningLM, settings: FSDPSettings, device: torch.device) -> None:
    """Shard `model` in place across all processes (see the module docstring for the units)."""
    if settings.activation_checkpointing:
        model.enable_gradient_checkpointing()
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    _meshes.append(weakref.ref(mesh))
    unit = dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    held = dict(mesh=mesh, reshard_after_forward=False)
    parts = model.parts
    for module in [*parts.layers, *model.aux_heads]:
        fully_shard(module, **unit)
    head_unit = [parts.final_norm, parts.head]
    if any(parts.head.weight is e.weight for e in parts.embeddings):
        fully_shard([*parts.embeddings, *head_unit], **held)
    else:
        fully_shard(list(parts.embeddings), **unit)
        fully_shard(head_unit, **held)
    fully_shard(model, **unit)
    register_fsdp_forward_method(model, "hidden_states")
    # The local loss subtracts from a head's output out of place, the case this warning says is safe.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPReconstructionHead\) returned a view")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum, which every backend (gloo too) has


def release_process_groups() -> None:
    """Make the device meshes `shard_model` made let go of their process groups (distributed.shutdown calls it).

    DTensor's sharding caches (module globals) keep the mesh of every DTensor operation that ran for the life of the
    process, and a mesh keeps its process groups (DeviceMesh._pg_registry, torch 2.13), so the groups and their
    threads would outlive destroy_process_group(). The registry only spares a name lookup under torch.compile, and a
    mesh is never used once its groups are destroyed.
    """
    for ref in _meshes:
        registry = getattr(ref(), "_pg_registry", None)
        if isinstance(registry, dict):
            registry.clear()
    _meshes.clear()


def reshard(model: nn.Module) -> None:
    """Free every unit's gathered parameters and register the shards again, as the end of a backward does."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_parameters(model: nn.Module) -> list[torch.Tensor]:
    """This process's parameter tensors: the shards under FSDP.

    The parameters gathered for a layer's forward are new tensors each time, so under FSDP the
    activation meter also counts the gathered weights autograd saves for backward.
    """
    return [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]


class FSDPBackend(ReplicatedBackend):
    """FSDP2: the replicated backend's step on a sharded model.

    FSDP reduce-scatters each unit's gradients into its shards during backward, so there is nothing
    left to sum after the window; saving gathers full tensors onto the main process.
    """

    name = "FSDP2"

    def __init__(self, device: torch.device, step: StepSettings, settings: FSDPSettings):
        super().__init__(device, step)
        refuse_unsharded_extras(step, self.name)
        self.settings = settings

    def prepare_model(self, model: LocalLearningLM) -> None:
        shard_model(model, self.settings, self.device)

    def reduce_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        pass  # FSDP has already summed the gradients into each shard

    def end_evaluation(self, model: LocalLearningLM) -> None:
        reshard(model)

    def local_parameters(self, model: LocalLearningLM) -> list[torch.Tensor]:
        return local_parameters(model)

    def full_state(self, model: LocalLearningLM, optimizer: torch.optim.Optimizer | None = None) -> FullState:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
        return split_full_weights(model, get_model_state_dict(model, options=options), optim)
