"""Evaluation: answer-based accuracy, held-out problems, perplexity, `lopt eval`, and the lm-eval adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopt.cli import main
from lopt.data.generated import gsm_symbolic_records
from lopt.data.tasks import EVAL_SEED, TASKS
from lopt.errors import LoptError
from lopt.evaluation.retention import perplexity, retention_text, token_windows
from lopt.evaluation.task import generate_answers, score, training_questions
from tiny_models import tiny_model, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("base"))


def test_score_counts_matching_final_answers():
    records = [{"question": f"q{i}", "answer": f"step\n#### {gold}"} for i, gold in enumerate(["72", "1000", "6", "3"])]
    completions = [
        "48 + 24 = 72\n#### 72.0",  # same number, other spelling
        "So she pays 1,000 dollars.",  # no ####: the last number counts
        "#### 5",  # wrong
        "I do not know.",  # no number at all
    ]
    result = score(records, completions)
    assert (result["n"], result["correct"], result["accuracy"]) == (4, 2, 0.5)
    assert [s["predicted"] for s in result["samples"]] == ["72.0", "1,000", "5", None]
    assert [s["correct"] for s in result["samples"]] == [True, True, False, False]


def test_batched_left_padded_generation_matches_one_at_a_time(base_dir):
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    questions = ["What is 2 + 2?", "Hello there, what is the answer to this much longer question?", "Hi"]
    batched = generate_answers(model, tokenizer, questions, batch_size=3, max_new_tokens=6)
    single = [generate_answers(model, tokenizer, [q], batch_size=1, max_new_tokens=6)[0] for q in questions]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored for training code that shares the tokenizer


def test_heldout_problems_skip_the_training_questions(tmp_path):
    pool = gsm_symbolic_records(8, EVAL_SEED)
    (tmp_path / "training_args.json").write_text(
        json.dumps({"model_name_or_path": "x", "dataset_preset": "gsm-symbolic", "seed": EVAL_SEED, "max_samples": 3})
    )
    seen = training_questions(tmp_path)
    assert seen == {r["question"] for r in pool[:3]}
    assert TASKS["gsm-symbolic"].heldout(5, seen) == pool[3:8]


def test_perplexity_matches_a_hand_computed_value():
    model = tiny_model("llama", layers=2)
    windows = torch.tensor([[5, 17, 42, 8, 99, 3], [7, 7, 250, 31, 2, 64]])
    nll, count = 0.0, 0
    for window in windows:
        logits = model(input_ids=window[None]).logits[0]
        for position in range(len(window) - 1):  # token t+1 predicted from tokens <= t
            log_probs = torch.log_softmax(logits[position].double(), dim=-1)
            nll -= log_probs[window[position + 1]].item()
            count += 1
    assert perplexity(model, windows, batch_size=1) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_windows_are_fixed_and_the_default_text_is_the_book_without_licence(base_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    text = retention_text()
    assert "IN THE YEAR 2889" in text and "Project Gutenberg License" not in text
    windows = token_windows(tokenizer, text, window=16, max_windows=3)
    assert windows.shape == (3, 16)
    assert windows.flatten().tolist() == tokenizer(text, add_special_tokens=False)["input_ids"][:48]
    with pytest.raises(LoptError, match="--retention_window"):
        token_windows(tokenizer, "too short", window=512, max_windows=3)


def test_retention_file_errors_name_the_flag(tmp_path):
    with pytest.raises(LoptError, match="--retention_file .*no such file"):
        retention_text(tmp_path / "missing.txt")


def test_lopt_eval_writes_eval_json_with_retention_against_the_starting_model(base_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)  # "training" changed the model
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run)
    (run / "training_args.json").write_text(
        json.dumps(
            {
                "model_name_or_path": str(base_dir),
                "method": "lopt",
                "dataset_preset": "gsm-symbolic",
                "seed": 1,
                "max_samples": 2,
            }
        )
    )
    (run / "eval.json").write_text('{"an": "earlier evaluation"}')
    monkeypatch.chdir(REPO)  # the custom lm-eval task names its data file relative to the repository
    code = main(
        [
            "eval",
            str(run),
            "--eval_samples",
            "2",
            "--max_new_tokens",
            "4",
            "--retention_window",
            "16",
            "--retention_windows",
            "2",
            "--harness",
            "lopt_tiny_arith",
            "--harness_include",
            "tests/data/lm_eval_tasks",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((run / "eval.json").read_text())
    assert result["task"] == "gsm-symbolic" and result["n"] == 2 and 0 <= result["accuracy"] <= 1
    assert result["base_model"] == str(base_dir) and result["retention_tokens"] == 32
    assert result["perplexity"] != result["base_perplexity"]
    assert result["retention_change"] == pytest.approx(result["perplexity"] / result["base_perplexity"] - 1)
    # lm-eval's own HF backend scored the saved folder on the 4-question local task.
    assert set(result["harness"]) == {"lopt_tiny_arith"}
    assert result["harness"]["lopt_tiny_arith"]["acc,none"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    err = capsys.readouterr().err
    assert "lopt_tiny_arith" in err  # the printed table has the harness column
    [kept] = run.glob("eval.*.json")  # the earlier evaluation, renamed aside and said, not replaced
    assert json.loads(kept.read_text()) == {"an": "earlier evaluation"} and kept.name in err.replace("\n", "")


def test_lopt_eval_rejects_bad_flags(base_dir, capsys):
    assert main(["eval", str(base_dir), "--eval_samples", "-1"]) == 2
    assert "--eval_samples must be >= 0" in capsys.readouterr().err


def test_lopt_eval_of_an_adapter_folder_loads_base_plus_adapter(base_dir, tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from lopt.models.lora import add_lora
    from lopt.runs import saved_parameters

    adapter = tmp_path / "adapter"
    lora = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")
    model = add_lora(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # "training" moved the adapter away from zero
    model.save_pretrained(adapter)  # peft names the base folder in adapter_config.json
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(adapter)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("COLUMNS", "300")  # the table's model cell unwrapped
    flags = ["--eval_samples", "0", "--retention_window", "16", "--retention_windows", "2"]
    harness = ["--harness", "lopt_tiny_arith", "--harness_include", "tests/data/lm_eval_tasks"]
    assert main(["eval", str(adapter), *flags, *harness]) == 0, capsys.readouterr().err
    result = json.loads((adapter / "eval.json").read_text())
    assert result["base_model"] == str(base_dir)
    assert result["adapter_parameters"] == saved_parameters(adapter) > 0
    assert result["perplexity"] != result["base_perplexity"]  # the adapter was applied
    assert result["harness"]["lopt_tiny_arith"]["acc,none"] in {0.0, 0.25, 0.5, 0.75, 1.0}  # lm-eval with peft=
    assert f"(LoRA adapter, {result['adapter_parameters']:,} trained parameters)" in capsys.readouterr().err
