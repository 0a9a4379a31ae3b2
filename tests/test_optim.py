"""--optim: AdamW with 32-bit state (torch) or 8-bit state (bitsandbytes), its state's size, and what is refused.

The resume of a run with 8-bit state is tested beside block steps' (test_block_step.py), the TRL recipes' optimizer
in test_dpo.py.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lopt.config import SFTConfig, parse_config
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.parallel.deepspeed import DeepSpeedBackend, ZeroSettings
from lopt.parallel.fsdp import FSDPBackend, FSDPSettings
from lopt.training.optim import build_optimizer, optimizer_class, optimizer_state_bytes
from lopt.training.step import forward_backward
from tiny_models import tiny_batch, tiny_model

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
BNB_BLOCK = 256  # elements per absmax scale of its block-wise 8-bit state


def adamw_8bit_state_bytes(sizes: list[int]) -> int:
    """bitsandbytes' AdamW8bit state for trained tensors of `sizes` elements, written out."""
    large = [n for n in sizes if n >= BNB_MIN_8BIT_SIZE]
    return (
        sum(2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) for n in large)  # two uint8 moments and their float32 scales
        + sum(2 * 4 * n for n in sizes if n < BNB_MIN_8BIT_SIZE)  # small tensors: two float32 moments
        + (2 * 256 * 4 if large else 0)  # the two quantization maps, shared by every parameter
    )


def _trained(optim: str, steps: int = 3) -> tuple[LocalLearningLM, torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = LocalLearningLM(tiny_model(layers=4), num_blocks=2).train()
    optimizer = build_optimizer(model, 1e-3, None, 0.01, optim)
    start = [p.detach().clone() for p in model.parameters()]
    for seed in range(steps):
        forward_backward(model, [tiny_batch(batch=3, seq=10, seed=seed)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, [p.detach() - s for p, s in zip(model.parameters(), start, strict=True)]


def test_the_state_bytes_are_what_each_optimizer_keeps_per_parameter():
    model, optimizer, _ = _trained("adamw_torch", steps=1)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    # exp_avg and exp_avg_sq in float32, and a float32 step count per parameter
    assert optimizer_state_bytes(optimizer) == sum(2 * 4 * n + 4 for n in sizes)

    model, optimizer, _ = _trained("adamw_8bit", steps=1)
    assert type(optimizer).__name__ == "AdamW8bit"
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    large = [n for n in sizes if n >= BNB_MIN_8BIT_SIZE]
    assert large, "the tiny model must have a tensor that gets 8-bit state"
    assert optimizer_state_bytes(optimizer) == adamw_8bit_state_bytes(sizes)
    state = optimizer.state[next(p for p in model.parameters() if p.numel() in large)]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8


def test_an_8bit_step_follows_adamw():
    _, _, full = _trained("adamw_torch")
    _, _, eight_bit = _trained("adamw_8bit")
    difference = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(full, eight_bit, strict=True)))
    size = math.sqrt(sum(float(a.pow(2).sum()) for a in full))
    assert size > 0 and difference < 0.1 * size, (difference, size)  # measured: 3% of the update


def _config(tmp_path, *flags) -> SFTConfig:
    return parse_config(["--output_dir", str(tmp_path), *flags], SFTConfig)


def test_paged_state_needs_cuda_and_names_what_runs_here():
    assert optimizer_class("paged_adamw_8bit", "cuda").__name__ == "PagedAdamW8bit"
    with pytest.raises(LoptError, match="needs CUDA.*use --optim adamw_8bit"):
        optimizer_class("paged_adamw_8bit", "cpu")


def test_an_unknown_optimizer_is_refused_with_the_choices(tmp_path):
    with pytest.raises(SystemExit):  # argparse: invalid choice, with the list
        _config(tmp_path, "--optim", "adamw8bit")
    with pytest.raises(LoptError, match="Did you mean 'adamw_8bit'"):
        optimizer_class("adamw8bit", "cpu")


def test_without_bitsandbytes_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(LoptError, match=r"pip install 'bitsandbytes>=0.50'.*or use --optim adamw_torch"):
        optimizer_class("adamw_8bit", "cpu")
    assert optimizer_class("adamw_torch", "cpu") is torch.optim.AdamW


def test_sharded_backends_refuse_8bit_state(tmp_path):
    config = _config(tmp_path, "--optim", "adamw_8bit")
    with pytest.raises(LoptError, match="--optim adamw_8bit under FSDP2.*--optim adamw_torch"):
        FSDPBackend(torch.device("cpu"), config, FSDPSettings())
    with pytest.raises(LoptError, match="--optim adamw_8bit under DeepSpeed ZeRO-3"):
        DeepSpeedBackend(torch.device("cpu"), ZeroSettings(stage=3), config)
