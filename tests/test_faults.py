"""Never lose a run: resume after SIGKILL, kills during a save, SIGINT/SIGTERM, disk and permission errors."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import start_lopt, wait_for, wait_until
from lopt.cli import main
from lopt.training import checkpoint as ckpt
from lopt.training.checkpoint import find_checkpoint

RECORDS = [
    {"question": f"What is {a} times {b}?", "answer": f"{a} x {b} = {a * b}\n#### {a * b}"}
    for a in range(2, 7)
    for b in range(2, 6)
]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def args(model_dir, train_file, out, *extra) -> list[str]:
    return [
        "sft",
        "--model_name_or_path",
        str(model_dir),
        "--train_file",
        str(train_file),
        "--output_dir",
        str(out),
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        *extra,
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_resume_after_sigkill_ends_with_the_same_weights(model_dir, train_file, tmp_path):
    constant = ("--lr_scheduler_type", "constant")  # so the killed run may be planned longer than 8 steps
    straight = tmp_path / "straight"
    assert main(args(model_dir, train_file, straight, "--max_steps", "8", "--save_steps", "3", *constant)) == 0

    killed = tmp_path / "killed"
    # A long run, so the kill lands after checkpoint-3 and before the end.
    process = start_lopt(args(model_dir, train_file, killed, "--max_steps", "400", "--save_steps", "3", *constant))
    wait_for(killed / "checkpoint-3", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (
        main(
            args(
                model_dir,
                train_file,
                killed,
                "--max_steps",
                "8",
                "--save_steps",
                "3",
                *constant,
                "--resume_from_checkpoint",
                str(killed / "checkpoint-3"),
            )
        )
        == 0
    )
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)


def test_resume_latest_continues_the_schedule_and_the_metrics(model_dir, train_file, tmp_path):
    out = tmp_path / "run"
    assert main(args(model_dir, train_file, out, "--max_steps", "4", "--save_steps", "2")) == 0
    straight = tmp_path / "straight"
    assert main(args(model_dir, train_file, straight, "--max_steps", "4")) == 0
    for name, tensor in weights(straight).items():  # checkpointing does not perturb the run
        torch.testing.assert_close(weights(out)[name], tensor, atol=1e-6, rtol=0)
    (out / "config.json").unlink()  # as if it had been stopped after checkpoint-2
    assert (
        main(
            args(
                model_dir,
                train_file,
                out,
                "--max_steps",
                "4",
                "--save_steps",
                "2",
                "--resume_from_checkpoint",
                "latest",
            )
        )
        == 0
    )
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3, 4]  # appended: the resumed run logs the steps it re-took


def test_a_failed_save_leaves_no_checkpoint_that_looks_complete(model_dir, train_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def crash_on_second_state(obj, path, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", crash_on_second_state)
    with pytest.raises(OSError):
        main(args(model_dir, train_file, out, "--max_steps", "6", "--save_steps", "2"))
    assert (out / "checkpoint-2" / "training_state.pt").exists()
    assert not (out / "checkpoint-4").exists() and not list(out.glob(".tmp-*"))
    assert find_checkpoint(out, "latest") == out / "checkpoint-2"
    assert not (out / "config.json").exists()  # no final model either


def test_a_kill_in_the_middle_of_a_save_is_ignored_by_latest(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / ckpt.TRAINING_STATE).write_bytes(b"x")
    (tmp_path / ".tmp-abc").mkdir()  # what a SIGKILL during a save leaves behind
    (tmp_path / ".tmp-abc" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoint-4").mkdir()  # a folder without training state is not a checkpoint
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(model_dir, train_file, tmp_path, signum, code):
    out = tmp_path / "run"
    process = start_lopt(args(model_dir, train_file, out, "--max_steps", "400", "--save_steps", "0"))
    assert_signal_finishes_the_step_and_saves(process, out, signum, code)


def assert_a_stop_before_the_first_logging_step_is_logged(process: subprocess.Popen, out: Path) -> None:
    """SIGTERM a run whose --logging_steps is far away as soon as it trains: the stopped step is logged and saved."""
    wait_for(out / "metrics.jsonl", process)  # the metrics file is opened when training begins
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged and find_checkpoint(out, "latest").name == f"checkpoint-{logged[-1]}"


def test_a_run_stopped_before_its_first_logging_step_logs_the_step_it_stopped_at(model_dir, train_file, tmp_path):
    out = tmp_path / "run"
    flags = args(model_dir, train_file, out, "--max_steps", "400", "--save_steps", "0", "--logging_steps", "1000")
    assert_a_stop_before_the_first_logging_step_is_logged(start_lopt(flags), out)


def assert_signal_finishes_the_step_and_saves(process: subprocess.Popen, out: Path, signum: int, code: int) -> None:
    """Signal a run once it has logged a step: it must exit with `code` after saving the step in flight."""
    wait_for(out / "metrics.jsonl", process)
    wait_until((out / "metrics.jsonl").read_text, "the first logged step in metrics.jsonl", process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    saved = find_checkpoint(out, "latest")
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert saved.name == f"checkpoint-{logged[-1]}"  # the step in flight finished, was logged and saved
    assert "--resume_from_checkpoint latest" in err and str(saved) in err
    assert not (out / "config.json").exists()  # no final model from a stopped run


def test_save_total_limit_keeps_the_newest(model_dir, train_file, tmp_path):
    out = tmp_path / "run"
    assert (
        main(args(model_dir, train_file, out, "--max_steps", "7", "--save_steps", "1", "--save_total_limit", "2")) == 0
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_resume_from_a_folder_that_is_not_a_checkpoint(model_dir, train_file, tmp_path, capsys):
    code = main(args(model_dir, train_file, tmp_path / "o", "--resume_from_checkpoint", str(tmp_path)))
    assert code == 2 and "not a lopt checkpoint" in capsys.readouterr().err
    code = main(args(model_dir, train_file, tmp_path / "o2", "--resume_from_checkpoint", "latest"))
    assert code == 2 and "no checkpoint-N/" in capsys.readouterr().err


def test_full_disk_is_reported_before_training(model_dir, train_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    code = main(args(model_dir, train_file, tmp_path / "o", "--max_steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "GiB free" in err and not (tmp_path / "o" / "metrics.jsonl").exists()


def test_unwritable_output_dir_is_reported_before_training(model_dir, train_file, tmp_path, capsys, monkeypatch):
    real = Path.write_bytes

    def refuse(self, data):
        if self.name == ".lopt-write-test":
            raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    code = main(args(model_dir, train_file, tmp_path / "o", "--max_steps", "1"))
    assert code == 2 and "not writable" in capsys.readouterr().err
