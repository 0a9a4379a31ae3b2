"""The command line's rough edges: what --help imports and shows, errors raised before a model loads, and the
wording of what a run prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from lopt.cli import main
from lopt.config import FLAG_GROUPS, DPOConfig, GRPOConfig, SFTConfig
from lopt.models.registry import ALIASES
from lopt.output import plural
from tiny_models import tiny_model_dir

HEAVY = ("torch", "transformers", "trl", "peft", "datasets")


def _help(command: str, capsys) -> str:
    """`lopt <command> --help` with the wrapping undone (argparse wraps at the terminal width)."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _flag_help(text: str, flag: str) -> str:
    """The help of `flag` in --help's `text`, on one line (without the flag's own metavar or --no- form)."""
    first, *lines = text.split(f"\n  {flag}", 1)[1].splitlines()
    words = re.split(r"\s{2,}", first.strip(), maxsplit=1)[1:]  # the help, when it starts on the flag's line
    for line in lines:
        if not line.startswith(" " * 4):  # the next flag, or the end of the section
            break
        words.append(line)
    return " ".join(" ".join(words).split())


@pytest.mark.parametrize("command", ["sft", "grpo", "dpo", "eval"])
def test_help_imports_no_model_library(command):
    # A fresh interpreter: this test process has imported them all already.
    code = (
        "import sys\nfrom lopt.cli import main\ntry:\n    main([sys.argv[1], '--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, command], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert "usage: lopt" in done.stdout


@pytest.mark.parametrize("cls", [SFTConfig, GRPOConfig, DPOConfig])
def test_every_flag_is_in_a_help_section(cls):
    grouped = {name for members in FLAG_GROUPS.values() for name in members}
    assert set(cls().to_json()) - grouped == {"config"}  # --config stays next to --help


def test_help_is_in_sections_and_says_each_default_once(capsys):
    text = _help("sft", capsys)
    sections = [line[:-1] for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert sections == [
        "options", "model", "data", "method and LoPT", "LoRA / adapters", "optimization", "validation",
        "output and logging", "hub", "distributed",
    ]  # fmt: skip
    lr_k1 = "LoPT: learning rate of embeddings, early blocks and heads (default: --learning_rate)"
    assert _flag_help(text, "--lr_k1") == lr_k1
    assert _flag_help(text, "--bf16") == "bfloat16 weights (default: on for CUDA with bf16 support, off on CPU)"
    flat = " ".join(text.split())
    assert "torchrun --nproc_per_node N -m lopt.cli <command>" in flat
    model_section = text.split("\nmodel:\n")[1].split("\n\n")[0]
    assert "--model_name_or_path" in model_section and "--trust_remote_code" in model_section


def test_trust_remote_code_help_says_what_turning_it_on_does(capsys):
    assert _flag_help(_help("sft", capsys), "--trust_remote_code") == (
        "run the Python code the model's repository ships (custom architectures); only for repositories you trust "
        "(default: False)"
    )


def test_grpo_and_dpo_help_have_their_own_sections(capsys):
    grpo = _help("grpo", capsys)
    assert "\ngeneration:\n  --num_generations" in grpo
    assert "\ndata:\n  --task" in grpo
    dpo = _help("dpo", capsys)
    assert "\ngeneration:" not in dpo and "\nLoRA / adapters:\n  --use_peft" in dpo


def test_eval_help_shows_the_defaults(capsys):
    flat = " ".join(_help("eval", capsys).split())
    for expected in (
        "(hub) (default: gsm-symbolic)",
        "skip task accuracy) (default: 200)",
        "in tokens (default: 256)",
        "sequences per forward (default: 16)",
        "tokens per window (default: 256)",
        "skip retention) (default: 32)",
        "harness task (default: all)",
    ):
        assert expected in flat, expected


@pytest.mark.parametrize("what", ["a folder that is not a model", "a path that does not exist"])
def test_eval_names_its_model_dir_argument(what, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if what == "a folder that is not a model":
        (tmp_path / "notes").mkdir()
        model, expected = "notes", "lopt eval: error: MODEL_DIR 'notes' exists but is not a model folder"
    else:
        model, expected = (
            "./nope",
            "lopt eval: error: MODEL_DIR './nope': no such folder, and not a Hugging Face hub id",
        )
    assert main(["eval", model]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected)
    assert "--model_name_or_path" not in err


def test_sft_with_a_missing_model_path_says_no_folder_and_lists_the_aliases(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--model_name_or_path", "./nope", "--output_dir", "out", "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lopt sft: error: --model_name_or_path './nope': no such folder, and not a Hugging Face hub")
    assert ", ".join(ALIASES) in err and "Repo id must" not in err


def _no_model_load(monkeypatch):
    import lopt.training.run

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(lopt.training.run, "load_model_and_tokenizer", load)


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_a_wrong_train_file_fails_before_the_model_loads(command, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    data = tmp_path / "data.txt"
    data.write_text("hello\n")
    flags = ["--model_name_or_path", str(tmp_path / "nope"), "--train_file", str(data)]
    assert main([command, *flags, "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]) == 2
    assert f"lopt {command}: error: --train_file {data}: unsupported file type '.txt'" in capsys.readouterr().err


def test_plural_agrees_with_the_count():
    assert plural(1, "step") == "1 step"
    assert plural(2, "step") == "2 steps"
    assert plural(1, "process", "processes") == "1 process"
    assert plural(1200, "example") == "1,200 examples"


def test_a_one_step_run_says_step_and_sequence_in_the_singular(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "What is 1 + 1?", "input": "", "output": "2"}) + "\n")
    flags = ["--model_name_or_path", str(model_dir), "--train_file", str(data), "--output_dir", str(tmp_path / "out")]
    assert (
        main(["sft", *flags, "--max_steps", "1", "--per_device_train_batch_size", "1", "--max_seq_length", "64"]) == 0
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "tokenizing the training data: 1 example," in err
    assert "| 1 example (0 skipped" in err
    assert "x 1 process = 1 sequence |" in err
    assert "| 1 step |" in err and "training: 1 step" in err
    assert "done: 1 step in" in err
