"""LoPT inside TRL on two processes (gloo, CPU): the gradients of one process on the global batch, one writer."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import TrainerCallback

from launch import WORLD, run_lopt, torchrun
from lopt.config import DPOConfig, parse_config
from lopt.errors import LoptError
from lopt.parallel.distributed import shutdown
from lopt.recipes.dpo import build_dpo_trainer
from lopt.training.checkpoint import load_training_state
from test_distributed import assert_gloo_threads_ended
from test_dpo import dpo_flags
from test_grpo import grpo_flags

MAX_GRAD_NORM = 0.05  # small enough to clip, so the test also sees that the mean is taken before the clip


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs(layers=6)


def dpo_config(model_dir, out, *extra) -> DPOConfig:
    """One LoPT (k=2, local backward) DPO step over 2 pairs, one pair per micro-batch."""
    return parse_config(
        [
            "--model_name_or_path",
            str(model_dir),
            "--output_dir",
            str(out),
            "--max_samples",
            "2",
            "--per_device_train_batch_size",
            "1",
            "--max_seq_length",
            "2048",
            "--max_steps",
            "1",
            "--save_steps",
            "0",
            "--logging_steps",
            "1",
            "--learning_rate",
            "1e-3",
            "--max_grad_norm",
            str(MAX_GRAD_NORM),
            *extra,
        ],
        DPOConfig,
        prog="lopt dpo",
    )


class CaptureGradients(TrainerCallback):
    """Saves the gradients the optimizer is about to apply: averaged across processes, and clipped."""

    def __init__(self, trainer, path: Path):
        self.trainer, self.path = trainer, path

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = dict(self.trainer.model.named_parameters())
        params |= {f"aux.{n}": p for n, p in self.trainer.lopt.aux_heads.named_parameters()}
        torch.save({n: p.grad.clone() for n, p in params.items() if p.grad is not None}, self.path)


def train_one_step(config: DPOConfig, grads_path: Path) -> None:
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    trainer = build_dpo_trainer(config, Path(config.output_dir))
    trainer.add_callback(CaptureGradients(trainer, grads_path))
    trainer.train()


def _dpo_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    # what torchrun sets for each process; accelerate joins the process group from it
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        train_one_step(dpo_config(model_dir, out), Path(out) / f"grads_rank{rank}.pt")
    finally:
        shutdown()  # as `lopt dpo` ends
    assert_gloo_threads_ended()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_lopt_dpo_step_has_the_gradients_of_one_process(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the two processes share the CPU (gloo), also next to one GPU
    mp.spawn(_dpo_worker, args=(_free_port(), str(model_dir), str(tmp_path / "two")), nprocs=WORLD, join=True)
    # One process, the same global batch of 2 pairs as 2 micro-batches of one pair each.
    train_one_step(dpo_config(model_dir, tmp_path / "one", "--gradient_accumulation_steps", "2"), tmp_path / "one.pt")
    expected = torch.load(tmp_path / "one.pt")
    assert any(n.startswith("aux.") for n in expected) and any("layers.0." in n for n in expected)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected.values()]))
    assert float(norm) == pytest.approx(MAX_GRAD_NORM, rel=1e-4)  # the clip was active
    # the norm before the clip (metrics.jsonl, main process): a mean over processes, not a sum
    (one,), (two,) = (
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    )
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5) and one["grad_norm"] > MAX_GRAD_NORM
    for rank in range(WORLD):
        got = torch.load(tmp_path / "two" / f"grads_rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=f"rank {rank}: {name}")


def test_lopt_grpo_under_torchrun_writes_from_the_main_process_only(model_dir, tmp_path):
    out = tmp_path / "run"
    flags = grpo_flags(model_dir, out, "--max_steps", "2", "--save_steps", "1")
    done = run_lopt(torchrun(), "grpo", *flags, cpu_only=True)
    assert f"{WORLD} processes" in done.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # one writer
    assert all(len(m["aux_loss"]) == 1 for m in metrics)
    completions = [json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()]
    assert completions == [1, 1, 2, 2]  # the main process's rows: 1 prompt x 2 completions per step
    for step in (1, 2):
        checkpoint = out / f"checkpoint-{step}"
        assert load_training_state(checkpoint)["step"] == step
        assert {f"rng_state_{rank}.pth" for rank in range(WORLD)} <= {p.name for p in checkpoint.iterdir()}
    assert (out / "config.json").exists()


def test_lopt_under_a_sharding_accelerate_config_is_refused(model_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # what `accelerate launch` with an FSDP config gives the trainer (it takes several processes to get for real)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(LoptError, match="data-parallel only.*FSDP.*torchrun"):
        build_dpo_trainer(dpo_config(model_dir, tmp_path), tmp_path)


def test_two_process_lopt_dpo_resumes_to_the_weights_of_an_uninterrupted_run(model_dir, tmp_path):
    def torchrun_dpo(out: Path, *extra: str) -> None:
        flags = dpo_flags(model_dir, out, "--lr_scheduler_type", "constant", "--save_steps", "2", *extra)
        run_lopt(torchrun(), "dpo", *flags, cpu_only=True)

    torchrun_dpo(tmp_path / "straight", "--max_steps", "4")
    torchrun_dpo(tmp_path / "stopped", "--max_steps", "2")  # a constant schedule: steps 1-2 of the same run
    torchrun_dpo(tmp_path / "stopped", "--max_steps", "4", "--resume_from_checkpoint", "latest")
    expected, got = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "stopped"))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    heads = [load_training_state(tmp_path / run / "checkpoint-4")["aux_heads"] for run in ("straight", "stopped")]
    for name in heads[0]:
        torch.testing.assert_close(heads[1][name], heads[0][name], atol=1e-6, rtol=0, msg=name)
