"""The CPU peak memory a run reports is its own: `reset_device_peak` starts a new one (Linux)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lopt.training.memory import device_peak_bytes, reset_device_peak

CPU = torch.device("cpu")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resettable peak is Linux's")
def test_a_reset_peak_forgets_an_earlier_allocation():
    reset_device_peak(CPU)
    before = device_peak_bytes(CPU)
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert device_peak_bytes(CPU) >= before + 60 * 2**20
    del big
    reset_device_peak(CPU)  # the 64 MiB are gone from the resident set: the new peak is below the old one
    assert device_peak_bytes(CPU) < before + 32 * 2**20
