"""train_sft.py / train_grpo.py run `lopt sft` / `lopt grpo` with the reference implementation's defaults.

Where the reference trains differently from lopt's own defaults (LR schedule, warm-up, which
`--max_samples` records, SFT prompt text) the scripts default to the reference and the `lopt`
commands keep lopt's; explicit flags and YAML keys win for both. The runs themselves are replaced
by a stub that keeps the parsed config: these tests are about which config each entry point parses.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from lopt.cli import main
from lopt.config import GRPOConfig, ReferenceGRPOConfig, ReferenceSFTConfig, SFTConfig, parse_config
from lopt.errors import LoptError

REPO = Path(__file__).resolve().parents[1]
REFERENCE = {"lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "select_samples": "random"}
LOPT = {"lr_scheduler_type": "linear", "warmup_ratio": 0.0, "select_samples": "first"}


class Parsed(Exception):
    """Raised by the stub run in place of training, carrying the config it was given."""

    def __init__(self, config):
        super().__init__()
        self.config = config


@pytest.fixture
def parsed(monkeypatch):
    """Stub out run_sft / run_grpo; returns a function that runs an entry point and gives its config."""
    from lopt.recipes import grpo, sft

    def stop(config, *args, **kwargs):
        raise Parsed(config)

    monkeypatch.setattr(sft, "run_sft", stop)
    monkeypatch.setattr(grpo, "run_grpo", stop)

    def run(entry: str, *argv: str):
        with pytest.raises(Parsed) as stopped:
            if entry.endswith(".py"):  # the script itself, as `python train_sft.py ...` runs it
                monkeypatch.setattr(sys, "argv", [entry, *argv])
                runpy.run_path(str(REPO / entry), run_name="__main__")
            else:
                main([entry, *argv])
        return stopped.value.config

    return run


def defaults(config, names) -> dict:
    return {name: getattr(config, name) for name in names}


def test_train_sft_py_parses_the_reference_defaults_and_lopt_sft_keeps_lopts(parsed):
    script = parsed("train_sft.py", "--output_dir", "o")
    assert type(script) is ReferenceSFTConfig
    assert defaults(script, REFERENCE) == REFERENCE and script.prompt_format == "reference"
    lopt = parsed("sft", "--output_dir", "o")
    assert type(lopt) is SFTConfig
    assert defaults(lopt, LOPT) == LOPT and lopt.prompt_format == "chat"
    # Every other default is the same for both.
    same = set(SFTConfig.__dataclass_fields__) - set(REFERENCE) - {"prompt_format"}
    assert defaults(script, same) == defaults(lopt, same)


def test_train_grpo_py_parses_the_reference_defaults_and_lopt_grpo_keeps_lopts(parsed):
    script = parsed("train_grpo.py", "--output_dir", "o")
    assert type(script) is ReferenceGRPOConfig and defaults(script, REFERENCE) == REFERENCE
    lopt = parsed("grpo", "--output_dir", "o")
    assert type(lopt) is GRPOConfig and defaults(lopt, LOPT) == LOPT
    same = set(GRPOConfig.__dataclass_fields__) - set(REFERENCE)
    assert defaults(script, same) == defaults(lopt, same)
    assert not hasattr(script, "prompt_format")  # an SFT flag only


def test_explicit_flags_win_over_the_reference_defaults(parsed):
    flags = ["--lr_scheduler_type", "linear", "--warmup_ratio", "0", "--select_samples", "first"]
    script = parsed("train_sft.py", "--output_dir", "o", *flags, "--prompt_format", "chat")
    assert defaults(script, LOPT) == LOPT and script.prompt_format == "chat"
    assert defaults(parsed("train_grpo.py", "--output_dir", "o", *flags), LOPT) == LOPT
    flags = ["--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--select_samples", "random"]
    lopt = parsed("sft", "--output_dir", "o", *flags, "--prompt_format", "reference")
    assert defaults(lopt, REFERENCE) == REFERENCE and lopt.prompt_format == "reference"


def test_yaml_config_works_with_the_reference_scripts(parsed, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr_scheduler_type: constant\nselect_samples: first\noutput_dir: out\n")
    config = parsed("train_sft.py", "--config", str(path), "--warmup_ratio", "0.1")
    assert (config.lr_scheduler_type, config.select_samples, config.warmup_ratio) == ("constant", "first", 0.1)
    assert config.prompt_format == "reference" and config.output_dir == "out"  # the rest: reference defaults
    assert parsed("train_grpo.py", "--config", str(path)).lr_scheduler_type == "constant"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("select_samples: randm\n", r"unknown --select_samples 'randm'\. Did you mean 'random'\?"),
        ("prompt_format: plain\n", r"unknown --prompt_format 'plain'\. Choose one of: chat, reference\."),
    ],
)
def test_yaml_values_are_checked_against_the_choices(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text + "output_dir: out\n")
    with pytest.raises(LoptError, match=message):
        parse_config(["--config", str(path)], ReferenceSFTConfig, prog="train_sft.py")


def test_errors_are_named_after_the_script(capsys):
    assert main(["sft", "--output_dir", "o", "--max_samples", "0"], reference=True) == 2
    assert capsys.readouterr().err.startswith("train_sft.py: error: --max_samples must be at least 1")
    with pytest.raises(ValueError, match="no reference script runs `lopt dpo`"):
        main(["dpo", "--output_dir", "o"], reference=True)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("train_sft.py", ["(default: cosine)", "(default: 0.03)", "(default: random)", "(default: reference)"]),
        ("train_grpo.py", ["(default: cosine)", "(default: 0.03)", "(default: random)"]),
    ],
)
def test_script_help_shows_the_reference_defaults(script, expected):
    done = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script}")
    help_text = " ".join(done.stdout.split())  # argparse wraps lines
    for default in expected:
        assert default in help_text, default


def test_the_sft_recipe_trains_on_the_subset_select_samples_picks(tmp_path):
    from lopt.data.presets import sft_records

    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(40)))
    flags = ["--train_file", str(path), "--max_samples", "4", "--output_dir", str(tmp_path / "o")]
    first = sft_records(parse_config(flags, SFTConfig))
    drawn = sft_records(parse_config(flags, ReferenceSFTConfig))
    assert [r["prompt"] for r in first] == ["q0", "q1", "q2", "q3"]
    assert len(drawn) == 4 and drawn != first and drawn == sft_records(parse_config(flags, ReferenceSFTConfig))
