"""What a person reads: a redirected run is one line per phase and per logged step, with no library noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lopt.output import QUIET_ENVIRONMENT
from lopt.training.callbacks import progress_line
from lopt.training.metrics import StepMetrics
from test_dpo import dpo_flags
from tiny_data import sft_args

NOISE = ("Loading weights", "Writing model shards", "it/s]", "Setting accelerator", "Warning", "warn(", "{'loss'")


def _run_to_file(args: list[str], log) -> str:
    """`lopt ARGS` in a subprocess with stdout and stderr redirected to a file, as a Slurm or nohup log is.

    Its environment lacks the libraries' quiet switches, which a `main()` called in this test process sets
    here: the subprocess starts as one from a user's shell does.
    """
    env = {name: value for name, value in os.environ.items() if name not in QUIET_ENVIRONMENT}
    with log.open("w") as fh:
        command = [sys.executable, "-m", "lopt.cli", *args]
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    text = log.read_text()
    assert code == 0, text
    return text


def test_redirected_sft_and_eval_print_a_line_per_phase_and_no_noise(model_dir, train_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    flags = sft_args(model_dir, train_file, out, "--max_steps", "3", "--logging_steps", "1", "--save_steps", "2")
    lines = _run_to_file(["sft", *flags], tmp_path / "sft.log").splitlines()
    starts = [
        "loading", "tokenizing the training data: 12 examples", "lopt sft:", "training: 3 steps", "step 1/3 |",
        "step 2/3 |", "saved", "step 3/3 |", "trained to step 3 of 3", "saving the model to", "done: 3 steps",
    ]  # fmt: skip
    assert len(lines) == len(starts) and all(line.startswith(s) for line, s in zip(lines, starts, strict=True)), lines
    logged = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert f"task loss {logged[0]['task_loss']:.4f}" in lines[4]  # the line shows the contract's values
    text = _run_to_file(["eval", str(out), "--eval_samples", "2", "--max_new_tokens", "4", "--retention_windows", "1",
                         "--retention_window", "16"], tmp_path / "eval.log")  # fmt: skip
    for phase in ("answering 2 held-out gsm-symbolic problems: ", "per-layer CKA against ", "wrote "):
        assert phase in text
    assert not [noise for noise in NOISE if noise in "\n".join(lines) + text]


def test_trl_recipes_print_lopts_progress_lines_instead_of_the_trainers(model_dir, tmp_path):  # noqa: F811
    text = _run_to_file(["dpo", *dpo_flags(model_dir, tmp_path / "dpo", "--max_steps", "2")], tmp_path / "dpo.log")
    assert "step 1/2 | task loss" in text and "reward_accuracy" in text and "trained to step 2 of 2" in text
    assert not [noise for noise in NOISE if noise in text]


def test_log_level_debug_lets_the_libraries_speak(model_dir, train_file, tmp_path):  # noqa: F811
    flags = sft_args(model_dir, train_file, tmp_path / "run", "--max_steps", "1", "--log_level", "debug")
    assert "Loading weights" in _run_to_file(["sft", *flags], tmp_path / "sft.log")


def test_a_progress_line_holds_the_contracts_fields_and_the_recipes_columns():
    metrics = StepMetrics(
        step=3, epoch=0.5, task_loss=1.23456, aux_loss=[0.1, None], lr=2e-5, lr_k1=1e-5, grad_norm=0.5,
        tokens_per_s=1234.5, peak_mem_bytes=1, activation_peak_bytes=2, elapsed_s=3725.0, recipe={"reward": 0.25},
    )  # fmt: skip
    line = progress_line(metrics, 10)
    assert line == ("step 3/10 | task loss 1.2346 | local 0.1000 - | lr 2.00e-05 / 1.00e-05 | grad norm 0.500 | "
                    "1,234 tokens/s | reward 0.250 | 1:02:05")  # fmt: skip
