"""`accelerate launch` with the shipped data-parallel config starts real processes, even on CPU."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from launch import PYTHON, accelerate, run_lopt
from tiny_data import SAY_RECORDS, sft_paths, write_jsonl


def sft_arguments(model_dir: Path, data: Path, out: Path, per_device: int) -> list[str]:
    flags = ["--max_steps", "2", "--per_device_train_batch_size", str(per_device), "--logging_steps", "1"]
    return ["sft", *sft_paths(model_dir, data, out), *flags]


def test_accelerate_launch_multi_gpu_config_runs_two_processes_like_one_on_the_global_batch(model_dir, tmp_path):
    # Without a GPU, the MULTI_GPU config still starts its processes through torch.distributed.run,
    # and lopt joins them over gloo: the same launcher and config a GPU node uses.
    data = write_jsonl(tmp_path / "train.jsonl", SAY_RECORDS)
    done = run_lopt(
        accelerate("configs/accelerate_multi_gpu.yaml"), *sft_arguments(model_dir, data, tmp_path / "two", 2)
    )
    assert "2 processes = 4 sequences" in done.stderr.replace("\n", " ")
    assert len((tmp_path / "two/metrics.jsonl").read_text().splitlines()) == 2  # one writer
    run_lopt(PYTHON, *sft_arguments(model_dir, data, tmp_path / "one", 4))
    two, one = load_file(str(tmp_path / "two/model.safetensors")), load_file(str(tmp_path / "one/model.safetensors"))
    assert two.keys() == one.keys()
    for name in one:
        # AdamW's first steps move a weight by about lr * g / |g|, so gradients that differ only by
        # rounding (padding differs per process) can move a weight differently by up to ~lr = 2e-5.
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=0)
