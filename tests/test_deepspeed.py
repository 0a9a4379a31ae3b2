"""DeepSpeed ZeRO-1/2/3 with local backward, on 2 CPU processes (gloo), and accelerate's DeepSpeed configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from launch import PYTHON, WORLD, accelerate, run_lopt, torchrun
from lopt.config import SFTConfig
from lopt.errors import LoptError
from lopt.parallel.deepspeed import DeepSpeedBackend, ZeroSettings, zero_settings_from_environment
from lopt.training.checkpoint import load_training_state
from lopt.training.step import forward_backward
from test_distributed import _halves, _wrapped, spawn
from test_fsdp import _micro_batches, _sft, _weights
from tiny_data import SAY_RECORDS, sft_paths, write_jsonl
from tiny_models import tiny_batch

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `make test` (the [deepspeed] extra)")


def _zero_worker(rank: int, out_dir: str, stage: int, num_blocks: int, micro: int, backward: str, checkpointing: bool):
    os.environ["LOCAL_RANK"] = str(rank)  # what a launcher sets; DeepSpeed asserts it
    model = _wrapped(num_blocks)
    if checkpointing:
        model.enable_gradient_checkpointing()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # SGD with lr 1 and no clipping: each weight moves by exactly minus its gradient, which reads
    # DeepSpeed's reduced gradient out of its partitions without DeepSpeed internals.
    backend = DeepSpeedBackend(
        torch.device("cpu"), ZeroSettings(stage), SFTConfig(max_grad_norm=0.0),
        extra_config={"zero_allow_untested_optimizer": True},
    )  # fmt: skip
    backend.prepare_optimizer(model, torch.optim.SGD(model.parameters(), lr=1.0))
    try:
        window = _micro_batches(_halves(tiny_batch(batch=4, seed=5))[rank], micro)
        forward_backward(model, window, backward, backend.backward, lm_head_context=backend.lm_head_context)
        backend.step(model, None, lambda grad_norm, step_taken: None)
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):  # a no-op below ZeRO-3
            grads = {n: before[n] - p.detach() for n, p in params.items()}
        torch.save(grads, Path(out_dir) / f"rank{rank}.pt")
    finally:
        backend.close()  # as run_sft ends: DeepSpeed lets go of the model, and of its process groups


@pytest.mark.parametrize(
    ("stage", "num_blocks", "micro", "backward", "checkpointing"),
    [
        (1, 2, 1, "local", False),
        (2, 2, 2, "local", False),
        (2, 4, 1, "local", False),
        (3, 2, 2, "local", False),
        (3, 4, 1, "local", False),
        (3, 2, 1, "joint", False),
        (3, 2, 2, "local", True),
        (2, 1, 1, "local", False),
        (3, 1, 1, "local", False),
    ],
    ids=[
        "zero1-k2",
        "zero2-k2-accumulation",
        "zero2-k4",
        "zero3-k2-accumulation",
        "zero3-k4",
        "zero3-k2-joint",
        "zero3-k2-checkpointing",
        "zero2-e2e-tied",
        "zero3-e2e-tied",
    ],
)
def test_zero_gradients_match_one_process_on_the_global_batch(
    tmp_path, stage, num_blocks, micro, backward, checkpointing
):
    spawn(_zero_worker, str(tmp_path / "init"), str(tmp_path), stage, num_blocks, micro, backward, checkpointing)
    model = _wrapped(num_blocks)  # one process, no DeepSpeed, the same global batch in the same micro-batches
    forward_backward(
        model, [mb for half in _halves(tiny_batch(batch=4, seed=5)) for mb in _micro_batches(half, micro)], backward
    )
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(expected) == len(dict(model.named_parameters()))  # every weight has a gradient to compare
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in expected:
            torch.testing.assert_close(
                got[name], expected[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )


# ---- accelerate's environment --------------------------------------------------------------------
DEEPSPEED_ENV = {"ACCELERATE_USE_DEEPSPEED": "true"}


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        (
            {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"},
            {},
            r"zero_stage: 0 .*configs/accelerate_multi_gpu.yaml.*Set zero_stage",
        ),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, {}, r"offload_optimizer_device: cpu .*: none"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, {}, r"offload_param_device: nvme .*: none"),
        ({"ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, {}, r"zero3_init_flag: true .*Set zero3_init_flag: false"),
        ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, {}, r"deepspeed_config_file: ds.json .*Remove"),
        (
            {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
            {},
            r"gradient_accumulation_steps: 4 .*differs from "
            r"--gradient_accumulation_steps 1",
        ),
        ({"ACCELERATE_GRADIENT_CLIPPING": "0.5"}, {}, r"gradient_clipping: 0.5 .*--max_grad_norm 1.0"),
        ({}, {"fp16": True}, r"--fp16 is not supported with DeepSpeed.*--bf16"),
    ],
)
def test_unsupported_settings_are_refused_by_name(monkeypatch, env, flags, message):
    for name, value in {**DEEPSPEED_ENV, **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LoptError, match=message):
        zero_settings_from_environment(SFTConfig(**flags))


def test_supported_settings_are_read(monkeypatch):
    for name, value in {
        **DEEPSPEED_ENV,
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_GRADIENT_CLIPPING": "1.0",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    }.items():
        monkeypatch.setenv(name, value)
    assert zero_settings_from_environment(SFTConfig()) == ZeroSettings(stage=3)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert zero_settings_from_environment(SFTConfig()) is None


# ---- lopt sft end to end -------------------------------------------------------------------------
def _accelerate(stage: int, processes: int = WORLD) -> list[str]:
    return accelerate(f"configs/accelerate_deepspeed_zero{stage}.yaml", processes)


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> tuple[Path, Path, dict[str, Path]]:
    """3 steps on 2 processes, a checkpoint each step: replicated (torchrun), ZeRO-2 and ZeRO-3."""
    root = tmp_path_factory.mktemp("deepspeed")
    data = write_jsonl(root / "train.jsonl", SAY_RECORDS)
    folders = {"plain": root / "plain", "zero2": root / "zero2", "zero3": root / "zero3"}
    _sft(torchrun(), model_dir, data, folders["plain"], "--lr_scheduler_type", "linear", "--warmup_ratio", "0.4")
    for stage in (2, 3):
        err = _sft(
            _accelerate(stage),
            model_dir,
            data,
            folders[f"zero{stage}"],
            "--lr_scheduler_type",
            "linear",
            "--warmup_ratio",
            "0.4",
        )
        assert f"DeepSpeed ZeRO-{stage} across 2 processes" in " ".join(err.split())  # rich wraps lines
    return model_dir, data, folders


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_saves_plain_models_equal_to_a_replicated_run(runs, stage):
    _, _, folders = runs
    run = folders[f"zero{stage}"]
    model, info = AutoModelForCausalLM.from_pretrained(run, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched: a plain HF model
    expected = _weights(folders["plain"])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)
    logged = [
        [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for folder in (run, folders["plain"])
    ]
    for zero_record, plain in zip(*logged, strict=True):
        assert zero_record["task_loss"] == pytest.approx(plain["task_loss"], rel=1e-6)
        assert zero_record["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
        assert zero_record["lr"] == pytest.approx(plain["lr"], rel=1e-9)
    state = load_training_state(run / "checkpoint-1")
    assert state["deepspeed"] == {"zero_stage": stage, "world_size": WORLD} and state["optimizer"] is None
    assert sorted(p.name for p in (run / "checkpoint-1/deepspeed").glob("*optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)
    ]
    assert not list(run.glob(".tmp-*"))  # every checkpoint was renamed into place


@pytest.mark.parametrize("stage", [2, 3])
def test_resuming_a_zero_checkpoint_ends_with_the_same_weights(runs, tmp_path, stage):
    model_dir, data, folders = runs
    run = folders[f"zero{stage}"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    _sft(
        _accelerate(stage),
        model_dir,
        data,
        resumed,
        "--lr_scheduler_type",
        "linear",
        "--warmup_ratio",
        "0.4",
        "--resume_from_checkpoint",
        str(run / "checkpoint-1"),
    )
    expected = _weights(run)  # steps 2 and 3 need the restored Adam moments to land on the same weights
    got = _weights(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=0)


def test_a_zero_checkpoint_is_refused_by_another_launch_with_the_fix(runs, tmp_path):
    model_dir, data, folders = runs
    flags = ["--max_steps", "3", "--per_device_train_batch_size", "2"]
    resume = ["--resume_from_checkpoint", str(folders["zero2"] / "checkpoint-1")]
    done = run_lopt(torchrun(), "sft", *sft_paths(model_dir, data, tmp_path / "out"), *flags, *resume, check=False)
    assert done.returncode != 0
    assert "holds DeepSpeed ZeRO-2 optimizer state from 2 processes" in done.stderr
    assert "configs/accelerate_deepspeed_zero2.yaml --num_processes 2" in done.stderr.replace("\n", " ")


def test_bf16_run_trains_like_float32_and_saves_bf16_weights(runs, tmp_path):
    """DeepSpeed's bf16 mode casts the whole wrapper, reconstruction heads included, to bf16."""
    model_dir, data, folders = runs
    _sft(
        _accelerate(3),
        model_dir,
        data,
        tmp_path / "bf16",
        "--bf16",
        "--lr_scheduler_type",
        "linear",
        "--warmup_ratio",
        "0.4",
    )
    assert {w.dtype for w in _weights(tmp_path / "bf16").values()} == {torch.bfloat16}
    logged = [
        [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for folder in (tmp_path / "bf16", folders["zero3"])
    ]
    for bf16, fp32 in zip(*logged, strict=True):
        assert bf16["task_loss"] == pytest.approx(fp32["task_loss"], rel=2e-2)
    assert (tmp_path / "bf16/checkpoint-1/deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()


def test_a_nan_loss_stops_before_deepspeed_steps_and_keeps_the_last_checkpoint(runs, tmp_path):
    model_dir, data, _ = runs
    out = tmp_path / "nan"
    flags = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--save_steps", "1"]
    blow_up = ["--learning_rate", "1e30", "--max_grad_norm", "0"]  # step 1 blows the weights up
    done = run_lopt(_accelerate(3), "sft", *sft_paths(model_dir, data, out), *flags, *blow_up, check=False)
    assert done.returncode != 0
    assert "Non-finite values at step 2: task loss = nan" in done.stderr
    assert "The optimizer step was not taken" in done.stderr
    assert (out / "checkpoint-1/training_state.pt").is_file()
    assert not (out / "checkpoint-2").exists() and not (out / "config.json").exists()


def test_one_process_under_a_zero_config_trains_like_a_plain_run(runs, tmp_path):
    """DeepSpeed needs a process group even for one process; lopt makes one when no launcher did."""
    model_dir, data, _ = runs
    one = _accelerate(2, processes=1)
    assert "DeepSpeed ZeRO-2 across 1 processes" in " ".join(_sft(one, model_dir, data, tmp_path / "zero").split())
    _sft(PYTHON, model_dir, data, tmp_path / "plain")
    expected = _weights(tmp_path / "plain")
    for name, value in _weights(tmp_path / "zero").items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)
