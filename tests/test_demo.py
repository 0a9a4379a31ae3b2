"""`lopt demo` end to end on a tiny random model: every run trained, every model scored on the same problems."""

from __future__ import annotations

import json

import pytest

from lopt.study import demo
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


def test_sweep_plans_each_knob_alone_at_each_k_and_trains_a_setting_the_study_has_once():
    runs = {run["dir"]: run for run in demo.planned_runs(demo.parse_args(["--sweep", "--learning_rate", "2e-4"]))}
    knobs = [name.split("=")[0] for name in demo.SWEEP_KNOBS]
    # the study's lopt-k2 (lr_k1 a tenth of the learning rate) is the sweep's lr_k1 run at k=2: one run, its name
    k2 = [f"lopt-k2-{knob}" if knob != "lr_k1" else "lopt-k2" for knob in knobs]
    assert [name for name in runs if "lopt" in name] == [
        "lopt-k2", "lopt-k2-paper", *(name for name in k2 if name != "lopt-k2"), "lopt-k4-paper",
        *(f"lopt-k4-{knob}" for knob in knobs),
    ]  # fmt: skip
    assert runs["lopt-k2"]["fields"] == {"method": "lopt", "num_blocks": 2, "lr_k1": pytest.approx(2e-5)}
    assert runs["lopt-k2"]["sweep"] == {"k": 2, "knob": "lr_k1=lr/10", "paper": "lopt-k2-paper"}
    assert runs["lopt-k2-paper"]["fields"] == {"method": "lopt", "num_blocks": 2}
    assert runs["lopt-k4-recon_normalized"]["fields"] == {
        "method": "lopt",
        "num_blocks": 4,
        "aux_loss": "recon_normalized",
    }
    assert runs["lopt-k4-recon_normalized"]["sweep"] == {"k": 4, "knob": "recon_normalized", "paper": "lopt-k4-paper"}
    assert "sweep" not in runs["e2e"] and "sweep" not in runs["lora"]
    every = [run["dir"] for run in demo.planned_runs(demo.parse_args(["--sweep", "--full"]))]
    assert "lopt-k4-lr_k1" not in every and every.count("lopt-k4") == 1  # --full's lopt-k4 is the sweep's lr_k1 run
    for run in runs.values():  # every swept setting is a valid lopt sft configuration
        if run.get("fields"):
            demo.run_config(demo.parse_args([]), run["dir"], run["fields"], 42)


def test_a_methods_lr_k1_is_a_fraction_of_its_own_learning_rate():
    runs = {run["dir"]: run for run in demo.planned_runs(demo.parse_args(["--full", "--seeds", "1"]))}
    assert runs["lopt-k2"]["fields"]["lr_k1"] == pytest.approx(1e-5)  # 1e-4 / 10
    assert runs["lopt-k2-lora"]["fields"]["lr_k1"] == pytest.approx(1e-4)  # LoRA's 1e-3 / 10
    assert "lr_k1" not in runs["e2e"]["fields"] and "lr_k1" not in runs["frozen-k2"]["fields"]
