"""Which parallel backend a launch asks for, read from what `torchrun` / `accelerate launch` set.

accelerate's FSDP2 config -> FSDP2 (fsdp.py); its DeepSpeed config -> ZeRO (deepspeed.py); anything
else (one process, torchrun, a data-parallel accelerate config) -> replicated (replicated.py). Each
reader refuses the settings lopt does not implement, by name, before anything is loaded.
"""

from __future__ import annotations

from lopt.config import SFTConfig
from lopt.parallel import distributed
from lopt.parallel.backend import ParallelBackend, StepSettings
from lopt.parallel.deepspeed import DeepSpeedBackend, zero_settings_from_environment
from lopt.parallel.fsdp import FSDPBackend, fsdp_settings_from_environment
from lopt.parallel.replicated import ReplicatedBackend


def backend_from_environment(config: SFTConfig) -> ParallelBackend:
    """Join the launcher's process group and return the backend for this process's device."""
    step = StepSettings.of(config)  # all a backend takes from the run's flags
    fsdp = fsdp_settings_from_environment(step)  # None unless launched with accelerate's FSDP2 config
    zero = zero_settings_from_environment(step)  # None unless launched with a DeepSpeed config
    device = distributed.init_from_environment("FSDP" if fsdp else "DeepSpeed" if zero else None)
    if fsdp is not None:
        return FSDPBackend(device, step, fsdp)
    if zero is not None:
        return DeepSpeedBackend(device, zero, step)
    return ReplicatedBackend(device, step)
