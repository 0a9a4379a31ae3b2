"""`accelerate launch` with the shipped data-parallel config starts real processes, even on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


def sft_arguments(model_dir: Path, data: Path, out: Path, per_device: int) -> list[str]:
    return [
        "sft",
        "--model_name_or_path",
        str(model_dir),
        "--train_file",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        str(per_device),
        "--logging_steps",
        "1",
    ]


@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
    reason="accelerate's launcher is not installed next to this Python",
)
def test_accelerate_launch_multi_gpu_config_runs_two_processes_like_one_on_the_global_batch(tmp_path):
    # Without a GPU, the MULTI_GPU config still starts its processes through torch.distributed.run,
    # and lopt joins them over gloo: the same launcher and config a GPU node uses.
    model_dir = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i}"}) + "\n" for i in range(12)))
    launcher = Path(sys.executable).parent / "accelerate"
    command = [
        str(launcher),
        "launch",
        "--config_file",
        str(REPO / "configs/accelerate_multi_gpu.yaml"),
        "--num_processes",
        "2",
        "-m",
        "lopt.cli",
        *sft_arguments(model_dir, data, tmp_path / "two", 2),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes = 4 sequences" in done.stderr.replace("\n", " ")
    assert len((tmp_path / "two/metrics.jsonl").read_text().splitlines()) == 2  # one writer
    single = subprocess.run(
        [sys.executable, "-m", "lopt.cli", *sft_arguments(model_dir, data, tmp_path / "one", 4)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = load_file(str(tmp_path / "two/model.safetensors")), load_file(str(tmp_path / "one/model.safetensors"))
    assert two.keys() == one.keys()
    for name in one:
        # AdamW's first steps move a weight by about lr * g / |g|, so gradients that differ only by
        # rounding (padding differs per process) can move a weight differently by up to ~lr = 2e-5.
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=0)
