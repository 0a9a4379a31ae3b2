"""Two processes (gloo, CPU) give the gradients of one process on the same global batch."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch import WORLD, run_lopt, torchrun
from lopt.models.local_learning import LocalLearningLM
from lopt.models.lora import add_lora
from lopt.parallel.distributed import all_reduce_gradients, shutdown
from lopt.training.step import forward_backward
from tiny_data import SAY_RECORDS, sft_paths, write_jsonl
from tiny_models import tiny_batch, tiny_model

LORA = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")


# ---- the processes' shared helper -------------------------------------------------------------------
def spawn(work: Callable, init_file: str, *args, timeout_s: float | None = None) -> None:
    """Run `work(rank, *args)` in WORLD processes that share a gloo process group (`init_file` names it): what every
    multi-process test here does. A process fails its test if `work` raises, or if it ends with gloo threads alive."""
    mp.spawn(_in_process_group, args=(init_file, timeout_s, work, *args), nprocs=WORLD, join=True)


def _in_process_group(rank: int, init_file: str, timeout_s: float | None, work: Callable, *args) -> None:
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, **timeout)
    try:
        work(rank, *args)  # its model and backend are released when it returns
    finally:
        shutdown()  # as lopt's own runs end (lopt.parallel.distributed.shutdown)
    assert_gloo_threads_ended()


def assert_gloo_threads_ended() -> None:
    """After lopt.parallel.distributed.shutdown: no gloo worker thread is left to outlive the process group.

    One still running when Python exits can abort the process after its work is done (SIGABRT, "terminate called
    without an active exception"; see shutdown's docstring). Checked every run, this also catches at once a new
    reference that keeps a group alive (as DeepSpeed's module stack did), which would otherwise crash rarely.
    """
    deadline = time.monotonic() + 10  # a joined thread can be listed a moment longer, while the kernel reaps it
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gloo_threads() == 0, (
        f"{gloo_threads()} gloo worker threads outlived destroy_process_group(): something still references a "
        "process group (a model, an engine, a library's module global)"
    )


def gloo_threads() -> int:
    """This process's gloo worker threads (torch names them pt_gloo_runloop); 0 without Linux's /proc."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return 0
    names = []
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text())
    return sum(name.startswith("pt_gloo") for name in names)


def _halves(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i::WORLD] for k, v in batch.items()} for i in range(WORLD)]


def _wrapped(backward_blocks: int, lora: bool = False) -> LocalLearningLM:
    base = tiny_model("llama", layers=4)
    torch.manual_seed(123)
    if lora:  # adapters with a nonzero B, so that every adapter matrix has a gradient
        base = add_lora(copy.deepcopy(base), LORA)
        for name, param in base.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    return LocalLearningLM(copy.deepcopy(base), num_blocks=backward_blocks).train()


def _worker(rank: int, out_dir: str, backward: str, num_blocks: int, lora: bool) -> None:
    model = _wrapped(num_blocks, lora)
    batch = tiny_batch(batch=4, seed=5)
    forward_backward(model, [_halves(batch)[rank]], backward=backward)
    all_reduce_gradients([p for p in model.parameters() if p.requires_grad])
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize(
    ("backward", "num_blocks", "lora"),
    [("local", 2, False), ("joint", 2, False), ("local", 1, False), ("local", 2, True)],
    ids=["local-k2", "joint-k2", "e2e", "local-k2-lora"],
)
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, backward, num_blocks, lora):
    spawn(_worker, str(tmp_path / "init"), str(tmp_path), backward, num_blocks, lora)
    # One process, the same global batch as two micro-batches (the per-process halves).
    model = _wrapped(num_blocks, lora)
    forward_backward(model, _halves(tiny_batch(batch=4, seed=5)), backward=backward)
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra", [(), ("--use_peft", "--lora_r", "4")], ids=["full", "lora"])
def test_lopt_sft_under_torchrun_writes_from_the_main_process_only(model_dir, tmp_path, extra):
    data = write_jsonl(tmp_path / "train.jsonl", SAY_RECORDS)
    out = tmp_path / "run"
    flags = ("--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "1")
    done = run_lopt(torchrun(), "sft", *sft_paths(model_dir, data, out), *flags, *extra)
    assert "2 processes = 4 sequences" in done.stderr.replace("\n", " ")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # one writer
    assert (out / "checkpoint-1").is_dir()
    assert (out / ("adapter_config.json" if extra else "config.json")).exists()


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_launch_configs_are_refused_not_silently_replicated(monkeypatch, variable):
    """What GRPO / DPO get; `lopt sft` reads the FSDP2 or DeepSpeed settings first and shards
    (test_fsdp.py, test_deepspeed.py), and is refused the other kind."""
    from lopt.errors import LoptError
    from lopt.parallel.distributed import init_from_environment

    monkeypatch.setenv(variable, "true")
    with pytest.raises(LoptError, match="(FSDP|DeepSpeed).*configs/accelerate_multi_gpu.yaml"):
        init_from_environment()
    other = "DeepSpeed" if variable == "ACCELERATE_USE_FSDP" else "FSDP"
    with pytest.raises(LoptError, match=f"asks for {'FSDP' if other == 'DeepSpeed' else 'DeepSpeed'}"):
        init_from_environment(sharded_by=other)
