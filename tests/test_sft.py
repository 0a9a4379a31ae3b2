"""`lopt sft` end to end on a tiny saved model, the config layer, and every bad input of the SFT recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lopt.cli import main
from lopt.config import SFTConfig, parse_config
from lopt.errors import LoptError
from lopt.recipes.registry import RECIPES
from lopt.training import step
from lopt.training.metrics import contract_errors
from lopt.training.step import StepResult
from tiny_data import sft_args

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(["sft", *args])
    return code, capsys.readouterr().err


def test_lopt_sft_writes_metrics_checkpoints_and_a_plain_model(model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(
        sft_args(
            model_dir,
            train_file,
            out,
            "--max_steps",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--logging_steps",
            "1",
            "--save_steps",
            "2",
            "--num_blocks",
            "2",
        ),
        capsys,
    )
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    keys = {
        "step",
        "epoch",
        "task_loss",
        "aux_loss",
        "lr",
        "lr_k1",
        "grad_norm",
        "tokens_per_s",
        "peak_mem_bytes",
        "activation_peak_bytes",
        "elapsed_s",
    }
    assert all(keys <= set(r) for r in lines)
    assert all(contract_errors(r, RECIPES["sft"]) == [] for r in lines)
    assert all(len(r["aux_loss"]) == 1 and r["activation_peak_bytes"] > 0 for r in lines)
    # the rate each step used (linear decay from 1e-3 over 4 steps, no warm-up), as TRL logs it
    assert [r["lr"] for r in lines] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert [r["lr_k1"] for r in lines] == [r["lr"] for r in lines]  # --lr_k1 defaults to --learning_rate
    assert lines[-1]["task_loss"] < lines[0]["task_loss"]  # lr 1e-3 on 12 examples: it must learn
    args = json.loads((out / "training_args.json").read_text())
    assert args["method"] == "lopt" and args["num_blocks"] == 2 and args["max_steps"] == 4
    assert (out / "checkpoint-2" / "training_state.pt").exists()
    assert not (out / "checkpoint-4").exists()  # the final model is the output dir itself
    assert not list(out.glob(".tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings is False
    umask = os.umask(0)
    os.umask(umask)
    for saved in (out / "model.safetensors", out / "checkpoint-2" / "model.safetensors"):
        assert saved.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as the files beside it
    state = torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert state["step"] == 2 and "aux_heads" in state and "optimizer" in state


def test_e2e_keeps_tied_embeddings(model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "e2e"
    code, err = run_cli(sft_args(model_dir, train_file, out, "--method", "e2e", "--max_steps", "2"), capsys)
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings is True
    assert "aux_loss" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_reference_smoke_command_runs_through_train_sft_py(model_dir, train_file, tmp_path):
    out = tmp_path / "smoke"
    command = [
        sys.executable,
        str(REPO / "train_sft.py"),
        "--model_name_or_path",
        str(model_dir),
        "--train_file",
        str(train_file),
        "--method",
        "ll",
        "--num_blocks",
        "2",
        "--max_seq_length",
        "64",
        "--max_samples",
        "16",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "1",
        "--output_dir",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").exists() and (out / "metrics.jsonl").exists()
    # The script trains as the reference does, not with `lopt sft`'s defaults.
    args = json.loads((out / "training_args.json").read_text())
    assert (args["lr_scheduler_type"], args["warmup_ratio"]) == ("cosine", 0.03)
    assert (args["select_samples"], args["prompt_format"]) == ("random", "reference")


# ---- the config layer ---------------------------------------------------------------------------


def test_yaml_config_merges_and_the_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 3.0e-4\nnum_blocks: 4\noutput_dir: out\ngradient_checkpointing: true\n")
    config = parse_config(["--config", str(path), "--num_blocks", "3"])
    assert config.learning_rate == 3e-4 and config.num_blocks == 3 and config.gradient_checkpointing is True
    assert {"learning_rate", "num_blocks", "output_dir"} <= config.explicit


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("learning_rat: 1e-4\n", r"unknown key 'learning_rat'\. Did you mean 'learning_rate'"),
        ("num_blocks: [2\noutput_dir: x\n", r"run\.yaml:\d+: malformed YAML"),
        ("num_blocks: two\n", "num_blocks must be a number"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_yaml_is_named_with_file_and_fix(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(LoptError, match=message):
        parse_config(["--config", str(path), "--output_dir", "out"])


def test_a_bad_schedule_and_zero_epochs_are_refused_before_anything_loads():
    with pytest.raises(LoptError, match=r"unknown --lr_scheduler_type 'cosin'\. Did you mean 'cosine'\?"):
        parse_config(["--output_dir", "o", "--lr_scheduler_type", "cosin"])
    with pytest.raises(LoptError, match=r"--num_train_epochs 0.0 trains nothing"):
        parse_config(["--output_dir", "o", "--num_train_epochs", "0"])
    parse_config(["--output_dir", "o", "--num_train_epochs", "0", "--max_steps", "3"])  # max_steps decides


def test_lopt_without_a_command_lists_them_and_fails(capsys):
    assert main([]) == 2
    assert "name a command" in capsys.readouterr().err


def test_unknown_flag_suggests_the_closest(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--output_dir", "o", "--num_block", "2"])
    assert "--num_blocks" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bf16", "--fp16"], "exclusive"),
        (["--method", "e2e", "--num_blocks", "4"], "--num_blocks applies to --method lopt only"),
        (["--num_blocks", "1"], "LoPT needs at least 2 blocks"),
        (["--max_samples", "0"], "--max_samples must be at least 1"),
        ([], "--output_dir is required"),
    ],
)
def test_conflicting_or_invalid_flags(argv, message):
    if "--output_dir" not in argv and message != "--output_dir is required":
        argv = [*argv, "--output_dir", "o"]
    with pytest.raises(LoptError, match=message):
        parse_config(argv)


def test_reference_method_alias_ll_is_lopt():
    assert parse_config(["--method", "ll", "--output_dir", "o"]).canonical_method == "lopt"


# ---- bad input at run time ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset_preset", "gsm-symbolc"], "gsm-symbolic"),
        (["--num_blocks", "9"], r"--num_blocks 9 is out of range .* from 2 to 4"),
    ],
)
def test_bad_choices_list_what_is_accepted(model_dir, tmp_path, capsys, extra, message):
    args = ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "o"), *extra]
    code, err = run_cli(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_unknown_model_alias_lists_aliases(tmp_path, capsys):
    code, err = run_cli(["--model_name_or_path", "smollm-135", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "smollm2-135m" in err and "qwen3-4b" in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "missing.jsonl"),
        ("train.txt", "a,b\n", r"\.json, \.jsonl, \.parquet, \.csv or a folder"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', r"bad\.jsonl:2"),
        ("cols.jsonl", '{"text": "a"}\n', "columns"),
        ("types.jsonl", '{"instruction": 5, "output": "b"}\n', "instruction"),
    ],
)
def test_bad_train_files(model_dir, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, err = run_cli(sft_args(model_dir, path, tmp_path / "o"), capsys)
    assert code == 2 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_everything_truncated_away_is_an_error(model_dir, train_file, tmp_path, capsys):
    code, err = run_cli(sft_args(model_dir, train_file, tmp_path / "o") + ["--max_seq_length", "8"], capsys)
    assert code == 2 and "--max_seq_length" in err


def test_fp16_without_cuda_is_refused(model_dir, train_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_cli(sft_args(model_dir, train_file, tmp_path / "o") + ["--fp16"], capsys)
    assert code == 2 and "--fp16 needs a CUDA GPU" in err


def test_liger_without_cuda_is_refused_before_the_output_dir_is_made(model_dir, train_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_cli(sft_args(model_dir, train_file, tmp_path / "o") + ["--liger"], capsys)
    assert code == 2 and "--liger needs a CUDA GPU" in err and "Drop --liger" in err
    assert not (tmp_path / "o").exists()


def test_non_empty_output_dir_is_refused_unless_overwrite(model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(sft_args(model_dir, train_file, out, "--max_steps", "1"), capsys)
    assert code == 2 and "--overwrite_output_dir" in err
    assert (out / "notes.txt").read_text() == "mine" and not (out / "metrics.jsonl").exists()
    code, err = run_cli(sft_args(model_dir, train_file, out, "--max_steps", "1", "--overwrite_output_dir"), capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # unrelated files are kept


def test_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(model_dir, train_file, tmp_path, capsys, monkeypatch):
    real = step.forward_backward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return StepResult(float("nan"), result.aux_losses, result.tokens, result.input_tokens)
        return result

    monkeypatch.setattr(step, "forward_backward", poisoned)  # train_step calls it
    out = tmp_path / "nan"
    code, err = run_cli(sft_args(model_dir, train_file, out, "--max_steps", "5", "--save_steps", "2"), capsys)
    assert code == 2 and "step 3" in err and "task loss = nan" in err
    assert (out / "checkpoint-2" / "config.json").exists()
    assert not (out / "checkpoint-3").exists() and not (out / "config.json").exists()


def test_config_defaults_match_the_reference():
    config = SFTConfig(output_dir="o")
    assert (config.method, config.num_blocks, config.lambda_aux, config.aux_loss, config.backward) == (
        "lopt",
        2,
        10.0,
        "recon",
        "local",
    )
    assert config.model_name_or_path == "smollm2-135m" and config.dataset_preset == "gsm-symbolic"
