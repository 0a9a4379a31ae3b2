"""Resume for lopt dpo / lopt grpo: after SIGKILL, from the newest complete checkpoint, never from an incomplete one."""

from __future__ import annotations

import json
import re
import shutil
import signal

import pytest
import torch

from launch import start_lopt, wait_for
from lopt.cli import main
from lopt.errors import LoptError
from lopt.recipes.grpo import run_grpo
from lopt.training.checkpoint import TRAINING_STATE, find_checkpoint, load_training_state
from test_dpo import dpo_flags
from test_faults import (
    assert_a_stop_before_the_first_logging_step_is_logged,
    assert_signal_finishes_the_step_and_saves,
    weights,
)
from test_grpo import grpo_config


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs(layers=6)


def dpo_args(model_dir, out, *extra) -> list[str]:
    """LoPT k=2, local backward, 2 steps an epoch; a constant schedule, so a run planned longer takes the same steps."""
    return ["dpo", *dpo_flags(model_dir, out, "--lr_scheduler_type", "constant", *extra)]


def run_to_end(arguments: list[str]) -> None:
    """`lopt ARGUMENTS` in a fresh process, which must succeed."""
    process = start_lopt(arguments)
    _, err = process.communicate()
    assert process.returncode == 0, err


def logged_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_resume_after_sigkill_ends_with_the_same_weights(model_dir, tmp_path):
    # Every run in a fresh process, as the killed one is: numerics of the tiny model's rare-token rows are
    # sensitive (Adam divides near-zero gradients by near-zero moments) to what an earlier test left in
    # this process, which once moved lm_head.weight by 1.3e-6 in a full test run.
    straight = tmp_path / "straight"
    run_to_end(dpo_args(model_dir, straight, "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "2"))
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]

    killed = tmp_path / "killed"
    process = start_lopt(dpo_args(model_dir, killed, "--max_steps", "400", "--save_steps", "2"))
    wait_for(killed / "checkpoint-2" / TRAINING_STATE, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    # The kill may land after later checkpoints; without them the resumed run re-takes steps 3 and 4.
    for later in killed.glob("checkpoint-*"):
        if later.name != "checkpoint-2":
            shutil.rmtree(later)
    # LoPT unties the LM head from the embeddings: the checkpoint holds both, trained apart.
    saved = weights(killed / "checkpoint-2")
    assert not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    assert load_training_state(killed / "checkpoint-2")["aux_heads"]  # the reconstruction head

    run_to_end(
        dpo_args(model_dir, killed, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "latest")
    )
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    heads_a = load_training_state(straight / "checkpoint-4")["aux_heads"]
    heads_b = load_training_state(killed / "checkpoint-4")["aux_heads"]
    for name in heads_a:
        torch.testing.assert_close(
            heads_b[name], heads_a[name], atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert logged_steps(straight) == [1, 2, 3, 4]
    steps = logged_steps(killed)  # appended: the killed run's steps, then the resumed run's 3 and 4
    assert steps[:2] == [1, 2] and steps[-2:] == [3, 4] and len(steps) >= 4


def test_grpo_resumes_from_the_newest_complete_checkpoint(model_dir, tmp_path):
    out = tmp_path / "run"
    flags = ("--save_steps", "1", "--gradient_accumulation_steps", "2")
    run_grpo(grpo_config(model_dir, out, "--max_steps", "2", *flags))
    (out / "checkpoint-2" / TRAINING_STATE).unlink()  # as if killed while writing checkpoint-2
    (out / "config.json").unlink()

    with pytest.raises(LoptError, match=f"incomplete.*Pass {re.escape(str(out / 'checkpoint-1'))}"):
        run_grpo(
            grpo_config(
                model_dir, out, "--max_steps", "3", *flags, "--resume_from_checkpoint", str(out / "checkpoint-2")
            )
        )
    result = run_grpo(grpo_config(model_dir, out, "--max_steps", "3", *flags, "--resume_from_checkpoint", "latest"))
    assert result.steps == 3
    assert logged_steps(out) == [1, 2, 2, 3]  # resumed after step 1, appended
    completions = [json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()]
    assert completions == [1] * 4 + [2] * 4 + [2] * 4 + [3] * 4
    assert [load_training_state(out / f"checkpoint-{s}")["step"] for s in (1, 2, 3)] == [1, 2, 3]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert (out / "config.json").exists()


def test_an_incomplete_checkpoint_is_refused_with_the_one_to_use(tmp_path):
    incomplete = tmp_path / "checkpoint-4"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"partial")  # TRL writes in place; the marker comes last
    with pytest.raises(LoptError, match="incomplete.*No complete checkpoint.*without --resume_from_checkpoint"):
        find_checkpoint(tmp_path, str(incomplete))
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / TRAINING_STATE).write_bytes(b"x")
    with pytest.raises(LoptError, match=f"incomplete.*Pass {re.escape(str(tmp_path / 'checkpoint-2'))} .*or 'latest'"):
        find_checkpoint(tmp_path, str(incomplete))
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_dpo_step_saves_and_says_how_to_resume(model_dir, tmp_path, signum, code):
    out = tmp_path / "run"
    process = start_lopt(dpo_args(model_dir, out, "--max_steps", "400", "--save_steps", "0"))
    assert_signal_finishes_the_step_and_saves(process, out, signum, code)


def test_a_dpo_run_stopped_before_its_first_logging_step_logs_the_step_it_stopped_at(model_dir, tmp_path):
    out = tmp_path / "run"
    flags = dpo_args(model_dir, out, "--max_steps", "400", "--save_steps", "0", "--logging_steps", "1000")
    assert_a_stop_before_the_first_logging_step_is_logged(start_lopt(flags), out)


def test_a_nan_loss_stops_the_dpo_run_before_its_optimizer_step(model_dir, tmp_path, monkeypatch, capsys):
    from trl import DPOTrainer

    real = DPOTrainer.compute_loss

    def poisoned_at_step_3(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 2 else loss

    monkeypatch.setattr(DPOTrainer, "compute_loss", poisoned_at_step_3)
    out = tmp_path / "run"
    assert main(dpo_args(model_dir, out, "--max_steps", "4", "--save_steps", "1")) == 2
    assert "Non-finite values at step 3: task loss = nan" in capsys.readouterr().err.replace("\n", " ")
    assert find_checkpoint(out, "latest").name == "checkpoint-2"  # the last good one stays; none of step 3
    assert not (out / "checkpoint-3").exists() and not (out / "config.json").exists()


def test_too_little_disk_is_reported_before_a_dpo_run_trains(model_dir, tmp_path, monkeypatch, capsys):
    from lopt.training import checkpoint

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    out = tmp_path / "run"
    assert main(dpo_args(model_dir, out, "--max_steps", "1")) == 2
    assert "GiB free" in capsys.readouterr().err and not (out / "metrics.jsonl").exists()
