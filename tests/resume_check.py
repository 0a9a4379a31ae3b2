"""The check every recipe's resume test makes: a resumed run ends on the uninterrupted run's weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def stop_after_checkpoint(out: Path) -> dict[str, torch.Tensor]:
    """The weights a finished run in `out` ended on; its final model is then removed, as if the run had stopped after
    a checkpoint, so that a resumed run writes it again."""
    straight = load_file(out / "model.safetensors")
    for name in ("model.safetensors", "config.json"):
        (out / name).unlink()
    return straight


def assert_resumed_to(out: Path, straight: dict[str, torch.Tensor]) -> None:
    """The resumed run's final model in `out` equals `straight`, tensor by tensor (1e-6)."""
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
