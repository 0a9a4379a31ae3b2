"""FSDP2 (fully_shard) with local backward, on 2 CPU processes (gloo), and accelerate's FSDP2 config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from launch import WORLD, accelerate, run_lopt, torchrun
from lopt.config import SFTConfig
from lopt.errors import LoptError
from lopt.parallel import fsdp
from lopt.parallel.fsdp import FSDPSettings, fsdp_settings_from_environment, shard_model
from lopt.parallel.replicated import ReplicatedBackend, load_optimizer_state
from lopt.training.checkpoint import load_training_state
from lopt.training.optim import build_optimizer
from lopt.training.step import forward_backward
from test_distributed import _halves, _wrapped, spawn
from tiny_data import SAY_RECORDS, sft_paths, write_jsonl
from tiny_models import tiny_batch


def _micro_batches(batch: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i::count] for k, v in batch.items()} for i in range(count)]


def _sharded_worker(rank: int, out_dir: str, num_blocks: int, micro: int, settings: FSDPSettings):
    model = _wrapped(num_blocks)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_model(model, settings, torch.device("cpu"))
    local_bytes = sum(t.numel() * t.element_size() for t in fsdp.local_parameters(model))
    window = _micro_batches(_halves(tiny_batch(batch=4, seed=5))[rank], micro)
    forward_backward(model, window, backward="local")
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    result = {"grads": grads, "full_bytes": full_bytes, "local_bytes": local_bytes}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize(
    ("num_blocks", "micro", "settings"),
    [
        (2, 2, FSDPSettings()),  # LoPT k=2, local backward, gradient accumulation over 2 micro-batches
        (1, 1, FSDPSettings(reshard_after_forward=False)),  # end-to-end, tied embeddings
        (2, 1, FSDPSettings(activation_checkpointing=True)),
    ],
    ids=["lopt-k2-accumulation", "e2e-tied-no-reshard", "lopt-k2-checkpointing"],
)
def test_sharded_gradients_match_one_process_on_the_global_batch(tmp_path, num_blocks, micro, settings):
    spawn(_sharded_worker, str(tmp_path / "init"), str(tmp_path), num_blocks, micro, settings)
    model = _wrapped(num_blocks)  # one process, unsharded, the same global batch in the same micro-batches
    forward_backward(model, [mb for half in _halves(tiny_batch(batch=4, seed=5)) for mb in _micro_batches(half, micro)])
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["grads"].keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got["grads"][name], expected[name], atol=1e-5, rtol=1e-5)
        # Every dimension of the tiny model is even, so each process holds exactly half of every parameter.
        assert got["local_bytes"] * WORLD == got["full_bytes"]


# ---- accelerate's environment --------------------------------------------------------------------
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"FSDP_VERSION": "1"}, {}, r"fsdp_version: 1 .*Set fsdp_version: 2 .*configs/accelerate_fsdp2.yaml"),
        ({"FSDP_OFFLOAD_PARAMS": "true"}, {}, r"fsdp_offload_params: true .*Set fsdp_offload_params: false"),
        ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, {}, r"fsdp_state_dict_type: SHARDED_STATE_DICT .*FULL_STATE"),
        ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, {}, r"fsdp_auto_wrap_policy: SIZE_BASED_WRAP .*TRANSFORMER"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, {}, r"fsdp_cpu_ram_efficient_loading: true .*false"),
        ({"FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD"}, {}, r"'full_shard' .*fsdp_reshard_after_forward.*true or false"),
        ({}, {"backward": "joint"}, r"--backward joint is not supported with FSDP.*--backward local"),
        ({}, {"fp16": True}, r"--fp16 is not supported with FSDP.*--bf16"),
    ],
    ids=[
        "fsdp1",
        "offload",
        "sharded-state-dict",
        "size-wrap",
        "ram-efficient-loading",
        "fsdp1-strategy",
        "joint-backward",
        "fp16",
    ],
)
def test_unsupported_settings_are_refused_by_name(monkeypatch, env, flags, message):
    for name, value in {**FSDP2_ENV, **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LoptError, match=message):
        fsdp_settings_from_environment(SFTConfig(**flags))


def test_supported_settings_are_read(monkeypatch):
    for name, value in {
        **FSDP2_ENV,
        "FSDP_RESHARD_AFTER_FORWARD": "false",
        "FSDP_ACTIVATION_CHECKPOINTING": "true",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_SYNC_MODULE_STATES": "true",
    }.items():
        monkeypatch.setenv(name, value)
    assert fsdp_settings_from_environment(SFTConfig()) == FSDPSettings(
        reshard_after_forward=False, activation_checkpointing=True
    )
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp_settings_from_environment(SFTConfig()) is None


# ---- lopt sft end to end -------------------------------------------------------------------------
def _sft(launcher: list[str], model_dir: Path, data: Path, out: Path, *extra: str) -> str:
    flags = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"]
    flags += ["--logging_steps", "1", "--save_steps", "1"]
    done = run_lopt(launcher, "sft", *sft_paths(model_dir, data, out), *flags, *extra)
    return done.stderr.replace("\n", " ")


ACCELERATE_FSDP2 = accelerate("configs/accelerate_fsdp2.yaml")


@pytest.fixture(scope="module")
def fsdp_run(model_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """`accelerate launch` with the shipped FSDP2 config: 3 steps on 2 processes, a checkpoint each step."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_jsonl(root / "train.jsonl", SAY_RECORDS)
    err = _sft(ACCELERATE_FSDP2, model_dir, data, root / "run")
    assert "FSDP2 across 2 processes" in err
    return model_dir, data, root / "run"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_fsdp_run_saves_plain_models_equal_to_an_unsharded_run(fsdp_run, tmp_path):
    model_dir, data, run = fsdp_run
    model, info = AutoModelForCausalLM.from_pretrained(run, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched: a plain HF model
    _sft(torchrun(), model_dir, data, tmp_path / "plain")  # the same run, replicated
    expected = _weights(tmp_path / "plain")
    assert _weights(run).keys() == expected.keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)
    start = _weights(model_dir)
    assert any(not torch.equal(value, start[name]) for name, value in expected.items() if name in start)  # trained
    logged = [
        [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for folder in (run, tmp_path / "plain")
    ]
    for sharded, plain in zip(*logged, strict=True):  # the gradient norm is computed over the shards
        assert sharded["task_loss"] == pytest.approx(plain["task_loss"], rel=1e-6)
        assert sharded["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    # The checkpoint holds the full optimizer state (not this process's shard), keyed by parameter name.
    moments = load_training_state(run / "checkpoint-1")["optimizer"]["state"]
    assert moments["model.lm_head.weight"]["exp_avg"].shape == model.lm_head.weight.shape


@pytest.mark.parametrize("launcher", [ACCELERATE_FSDP2, torchrun()], ids=["sharded", "unsharded"])
def test_resuming_a_sharded_checkpoint_ends_with_the_same_weights(fsdp_run, tmp_path, launcher):
    model_dir, data, run = fsdp_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    _sft(launcher, model_dir, data, resumed, "--resume_from_checkpoint", str(run / "checkpoint-1"))
    expected = _weights(run)  # steps 2 and 3 need the restored Adam moments to land on the same weights
    got = _weights(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=0)


@pytest.mark.parametrize("saved_format", ["by-name", "by-position"])
def test_unsharded_optimizer_state_round_trips(saved_format):
    """By name: what checkpoints hold now; by position: optimizer.state_dict(), lopt's format before FSDP."""
    model = _wrapped(2)
    optimizer = build_optimizer(model, 1e-3, None, 0.0)
    forward_backward(model, [tiny_batch()])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # resuming loads the state before any backward, as here
    backend = ReplicatedBackend(torch.device("cpu"), SFTConfig())
    saved = backend.full_state(model, optimizer).optimizer if saved_format == "by-name" else optimizer.state_dict()
    restored = build_optimizer(model, 1e-3, None, 0.0)
    load_optimizer_state(model, restored, saved)
    for before, after in zip(optimizer.param_groups, restored.param_groups, strict=True):
        for p, q in zip(before["params"], after["params"], strict=True):
            torch.testing.assert_close(restored.state[q]["exp_avg"], optimizer.state[p]["exp_avg"], atol=0, rtol=0)
