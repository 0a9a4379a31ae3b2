"""`lopt demo` end to end on a tiny random model: every run trained, every model scored on the same problems."""

from __future__ import annotations

import json

import pytest

from lopt.tools import demo
from tiny_models import tiny_model_dir


def test_the_study_trains_each_method_and_scores_every_model_on_the_same_problems(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "study"
    demo.main(
        ["--model", str(model), "--steps", "2", "--batch_size", "2", "--max_seq_length", "1024", "--eval_samples", "6",
         "--second_samples", "5", "--max_new_tokens", "3", "--retention_windows", "2", "--output_dir", str(out)]
    )  # fmt: skip
    study = json.loads((out / "study.json").read_text())
    assert [run["dir"] for run in study["runs"]] == ["base", "e2e", "lopt-k2", "lora"]
    assert study["task"] == "aiw" and study["second_task"] == "chain-sum" and study["reference"] == "e2e"
    evaluations = {run["dir"]: json.loads((out / run["dir"] / "eval.json").read_text()) for run in study["runs"]}
    samples = {name: [s["question"] for s in e["samples"]] for name, e in evaluations.items()}
    assert all(questions == samples["base"] for questions in samples.values())  # the same held-out problems
    for name, evaluation in evaluations.items():
        assert evaluation["task"] == "aiw" and evaluation["n"] == 6 and len(evaluation["per_problem"]) == 6
        low, high = evaluation["accuracy_interval"]
        assert 0 <= low <= evaluation["accuracy"] <= high <= 1
        assert evaluation["second_task"]["task"] == "chain-sum" and evaluation["second_task"]["n"] == 5
        assert evaluation["retention_tokens"] == 2 * 256
        if name == "base":
            assert evaluation["kl_to_base"] == 0.0 and evaluation["retention_change"] == 0.0
        else:  # trained: it moved, and the per-layer measures cover the tiny model's 4 layers
            assert evaluation["kl_to_base"] > 0 and len(evaluation["layer_cka"]) == 4
            assert len(evaluation["layer_weight_change"]) == 4
    lora_change = evaluations["lora"]["layer_weight_change"]
    assert all(change > 0 for change in lora_change)  # merged adapters on every layer's projections
    report = (out / "report.md").read_text()
    assert all(name in report for name in ("e2e", "lopt-k2", "lora", "base"))
    assert (out / "report.html").is_file() and (out / "layers.png").is_file()
    printed = capsys.readouterr().out
    assert "| e2e" in printed or "e2e |" in printed  # the table, copyable, on stdout


def test_full_study_plans_every_method_per_seed_in_its_own_folder():
    args = demo.parse_args(["--full", "--seeds", "2"])
    runs = demo.planned_runs(args)
    names = [*demo.METHODS, *demo.FULL_METHODS]
    assert [run["dir"] for run in runs] == ["base", *names, *(f"{name}-seed43" for name in names)]
    assert {run["learning_rate"] for run in runs if run["name"] in ("lora", "lopt-k2-lora")} == {1e-3}
    assert demo.parse_args(["--full"]).seeds == 2 and demo.parse_args([]).seeds == 1


def test_second_task_must_differ_from_the_trained_task(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--task", "chain-sum", "--second_task", "chain-sum"])
    assert "--second_task must differ from --task" in capsys.readouterr().err
