"""`lopt demo`'s study report on a fabricated study folder: the table's cells, the flags, the conclusions, the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lopt.errors import LoptError
from lopt.study import demo
from lopt.study.docs import BEGIN, END, write_docs
from lopt.study.report import conclusions, write_study_report
from lopt.study.results import Accuracy, Measure, MethodRow

MiB = 2**20
N = 20  # held-out problems of the task and of the second task

# Per-problem correctness on the same 20 problems, in order.
E2E_42 = [True] * 10 + [False] * 10  # 10/20
E2E_43 = [True] * 12 + [False] * 8  # 12/20
LOPT = [True] * 16 + [False] * 4  # 16/20: right where E2E (seed 42) is, and on 6 more
KL_SFT = [True] * 8 + [False] * 2 + [True] * 4 + [False] * 6  # 12/20
BASE = [True] * 4 + [False] * 16  # 4/20


def scores(per_problem: list[bool]) -> dict:
    correct = sum(per_problem)
    return {"n": len(per_problem), "correct": correct, "accuracy": correct / len(per_problem),
            "per_problem": per_problem}  # fmt: skip


def evaluation(per_problem, second_correct, ppl_change, kl=None, n_layers=4) -> dict:
    e = {
        "task": "aiw", "max_new_tokens": 32, **scores(per_problem),
        "second_task": {"task": "chain-sum", **scores([True] * second_correct + [False] * (N - second_correct))},
        "perplexity": 20 * (1 + ppl_change), "base_perplexity": 20.0, "retention_change": ppl_change,
        "retention_source": "book.txt", "retention_tokens": 4096,
        "layer_cka": [1 - 0.01 * i for i in range(n_layers)],
        "layer_weight_change": [0.001 * i for i in range(n_layers)],
    }  # fmt: skip
    if kl is not None:
        e["kl_to_base"] = kl
    return e


def write_run(out: Path, folder: str, evaluation: dict, method: dict | None = None, rows: int = 5,
              activation_mib: float = 10.0, memory_mib: float = 900.0, blocks: int = 0) -> None:  # fmt: skip
    """A run folder as `lopt sft` and `lopt eval` leave it: `rows` logged steps, one local loss per LoPT block."""
    path = out / folder
    path.mkdir(parents=True)
    (path / "eval.json").write_text(json.dumps(evaluation))
    if method is None:  # the starting model: evaluated, not trained
        return
    (path / "training_args.json").write_text(json.dumps({"model_name_or_path": "smollm2-135m", **method}))
    lines = [
        {
            "step": i + 1, "epoch": 0.1 * (i + 1), "task_loss": 2.0 - 0.1 * i,
            "aux_loss": [0.5 / (i + 1)] * blocks, "lr": 1e-4, "lr_k1": 1e-4, "grad_norm": 1.0,
            "tokens_per_s": 100.0 + 10 * i,  # mean over the 5 rows: 120
            "peak_mem_bytes": int(memory_mib * MiB),
            "activation_peak_bytes": int(activation_mib * MiB) * (i + 1) // rows,  # the peak: activation_mib
            "elapsed_s": 1.0 * (i + 1),
        }
        for i in range(rows)
    ]  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture()
def study(tmp_path) -> Path:
    out = tmp_path / "study"
    write_run(out, "base", evaluation(BASE, 10, 0.0, kl=0.0))
    write_run(out, "e2e", evaluation(E2E_42, 6, 0.10, kl=0.05), {"method": "e2e"}, activation_mib=40)
    write_run(out, "e2e-seed43", evaluation(E2E_43, 8, 0.12, kl=0.07), {"method": "e2e"}, activation_mib=40)
    write_run(out, "lopt-k2", evaluation(LOPT, 9, 0.02, kl=0.02), {"method": "lopt", "num_blocks": 2}, blocks=1)
    # kl-sft's eval.json has no KL: a missing measure
    write_run(out, "kl-sft", evaluation(KL_SFT, 10, 0.01), {"method": "e2e", "kl_beta": 0.1}, activation_mib=40,
              memory_mib=1000)  # fmt: skip
    # lora was scored on 10 problems, not 20: not comparable
    lora = evaluation([True] * 5 + [False] * 5, 10, 0.0, kl=0.001)
    write_run(out, "lora", lora, {"method": "e2e", "use_peft": True}, activation_mib=12, memory_mib=950)
    save_file({"w": torch.zeros(1000, 3), "b": torch.zeros(5)}, str(out / "e2e" / "model.safetensors"))  # 3,005
    runs = [
        {"name": "base", "method": "base", "seed": None, "dir": "base"},
        {"name": "e2e", "method": "e2e", "seed": 42, "dir": "e2e", "learning_rate": 1e-4},
        {"name": "lopt-k2", "method": "lopt-k2", "seed": 42, "dir": "lopt-k2", "learning_rate": 1e-4,
         "notes": "k=2 | local losses"},
        {"name": "kl-sft", "method": "kl-sft", "seed": 42, "dir": "kl-sft", "learning_rate": 1e-4},
        {"name": "lora", "method": "lora", "seed": 42, "dir": "lora", "learning_rate": 1e-3},
        {"name": "e2e", "method": "e2e", "seed": 43, "dir": "e2e-seed43", "learning_rate": 1e-4},
    ]  # fmt: skip
    settings = {"steps": 5, "batch_size": 4, "max_seq_length": 128, "seeds": [42, 43], "eval_samples": N,
                "second_samples": N, "retention_windows": 4, "retention_window": 1024,
                "max_new_tokens": 32}  # fmt: skip
    (out / "study.json").write_text(json.dumps({
        "title": "study", "task": "aiw", "second_task": "chain-sum", "reference": "e2e", "settings": settings,
        "runs": runs,
    }))  # fmt: skip
    return out


def table(text: str) -> dict[str, list[str]]:
    """The first table of a report.md, each row's cells by its first cell."""
    lines = [line for line in text.split("## Conclusions")[0].splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:])}


def test_study_table_aggregates_seeds_and_tests_against_the_reference(study):
    rows = write_study_report(study)
    assert [r.name for r in rows] == ["base", "e2e", "lopt-k2", "kl-sft", "lora"]
    cells = table((study / "report.md").read_text())
    # method | seeds | accuracy | Δ vs e2e | second accuracy | second Δ | ppl change | KL | params | tokens/s |
    # activation MiB | memory MiB
    # 16/20, p = 0.8, z^2 = 3.841459: center (0.8 + 0.0960365) / 1.1920729 = 0.7516649,
    # half 1.959964 * sqrt(0.008 + 0.0024009) / 1.1920729 = 0.1676824 -> [58.4, 91.9].
    # McNemar vs e2e seed 42: 6 problems only lopt-k2 got, none only e2e got: p = 2 * (1/2)^6 = 0.03125.
    # Second task 9/20 = 45% vs the starting model's 10/20: -5.0 points; 1 problem only the starting model got: p=1.
    assert cells["lopt-k2"][1:] == [
        "42", "80.0% [58.4, 91.9] n=20", "+25.0 pts, p=0.031", "45.0% [25.8, 65.8] n=20", "-5.0 pts, p=1", "+2.0%",
        "0.0200", "-", "120", "10.0", "900",
    ]  # fmt: skip
    # Two seeds: 10/20 and 12/20 -> mean 55.0%, std sqrt(2 * 0.05^2 / 1) = 7.1 points; pooled 22/40 -> [39.8, 69.3].
    # Second task 6/20 and 8/20 vs 10/20: -20 and -10 points -> -15.0 ± 7.1; McNemar on seed 42: 4 problems only the
    # starting model got, p = 2 * (1/2)^4 = 0.125. Perplexity +10% and +12%: +11.0 ± 1.4.
    assert cells["e2e"][1:] == [
        "42, 43", "55.0% ± 7.1 [39.8, 69.3] n=2×20", "-", "35.0% ± 7.1 [22.1, 50.5] n=2×20",
        "-15.0 pts ± 7.1 pts, p=0.12",
        "+11.0% ± 1.4%", "0.0600 ± 0.0141", "3,005", "120 ± 0", "40.0 ± 0.0", "900 ± 0",
    ]  # fmt: skip
    # kl-sft vs e2e seed 42: 4 problems only kl-sft got, 2 only e2e got: p = 2 * (1 + 6 + 15) / 64 = 0.6875.
    assert cells["kl-sft"][3] == "+5.0 pts, p=0.69" and cells["kl-sft"][7] == "-"
    assert cells["base"][1:4] == ["-", "20.0% [8.1, 41.6] n=20", "-35.0 pts, p=0.031"]  # 0 vs 6 discordant: 2/64


def test_a_row_evaluated_on_other_problems_is_flagged_and_left_out(study):
    rows = {r.name: r for r in write_study_report(study)}
    assert rows["lora"].differences == ["problems 10 (reference 20)"]
    text = (study / "report.md").read_text()
    cells = table(text)
    assert cells["lora ⚠"][2:4] == ["50.0% [23.7, 76.3] n=10", "not comparable"]
    assert "⚠ lora was evaluated differently from e2e: problems 10 (reference 20)." in text
    assert (
        "- lora is left out of the accuracy and retention comparisons: evaluated differently from the reference "
        "(problems 10 (reference 20))."
    ) in text


def test_study_report_writes_plots_html_conclusions_and_sweep(study):
    write_study_report(study)
    for name in ("report.md", "report.html", "accuracy_retention.png", "layers.png", "training_loss.png"):
        assert (study / name).stat().st_size > 0, name
    text = (study / "report.md").read_text()
    # the loss curves use every logged row, not a subsample
    assert "logged points: e2e 5, e2e-seed43 5, lopt-k2 5, kl-sft 5, lora 5" in text
    assert "- Best task accuracy: lopt-k2 with 80.0% [58.4, 91.9] n=20." in text
    assert "vs e2e (55.0%): +25.0 points, significant (McNemar p=0.031)" in text
    assert "vs kl-sft (60.0%): +20.0 points, not significant (p=0.12)" in text  # 4 vs 0 discordant: 2/16
    # the demo prints the table as report.md's third block
    assert text.split("\n\n", 2)[-1].split("\n\n")[0].startswith("| method | seeds |")
    assert "k=2 \\| local losses" in text  # a note's | cannot break the setup's Markdown
    page = (study / "report.html").read_text()
    assert "`" not in page and "<table>" in page and '<img alt="' in page and 'src="layers.png"' in page


def test_second_task_changes_are_tested_against_the_starting_model(study):
    text = (write_study_report(study), (study / "report.md").read_text())[1]
    # e2e seed 42 6/20 vs 10/20 (p=0.125), lopt-k2 9/20 (p=1), kl-sft 10/20 (no discordant problem: p=1)
    assert (
        "- The change in chain-sum accuracy vs the starting model is significant for no method; not significant for "
        "e2e (p=0.12), lopt-k2 (p=1) and kl-sft (p=1) (exact McNemar on the same problems, first seed)."
    ) in text


def test_sweep_section_compares_each_knob_with_the_papers_setting_at_its_k(study):
    write_run(study, "lopt-k2-lambda_aux", evaluation([True] * 18 + [False] * 2, 10, 0.03, kl=0.03),
              {"method": "lopt", "num_blocks": 2, "lambda_aux": 1.0}, blocks=1)  # fmt: skip
    write_run(study, "lopt-k4-paper", evaluation(E2E_42, 4, 0.2, kl=0.1), {"method": "lopt", "num_blocks": 4},
              blocks=3)  # fmt: skip
    spec = json.loads((study / "study.json").read_text())
    for entry in spec["runs"]:
        if entry["name"] == "lopt-k2":
            entry["sweep"] = {"k": 2, "knob": "paper", "paper": "lopt-k2"}
    spec["runs"] += [
        {"name": "lopt-k2-lambda_aux", "method": "lopt-k2-lambda_aux", "seed": 42, "dir": "lopt-k2-lambda_aux",
         "sweep": {"k": 2, "knob": "lambda_aux=1", "paper": "lopt-k2"}},
        {"name": "lopt-k4-paper", "method": "lopt-k4-paper", "seed": 42, "dir": "lopt-k4-paper",
         "sweep": {"k": 4, "knob": "paper", "paper": "lopt-k4-paper"}},
    ]  # fmt: skip
    (study / "study.json").write_text(json.dumps(spec))
    write_study_report(study)
    sweep = (study / "report.md").read_text().split("## LoPT's knobs (--sweep)")[1]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in sweep.splitlines() if line.startswith("| ")]
    assert rows[0][:5] == ["k", "knob", "method", "task accuracy", "Δ vs paper's setting (McNemar)"]
    assert [row[:3] for row in rows[1:]] == [
        ["2", "paper", "lopt-k2"], ["2", "lambda_aux=1", "lopt-k2-lambda_aux"], ["4", "paper", "lopt-k4-paper"]
    ]  # fmt: skip
    # 18/20 vs the paper setting's 16/20: 2 problems only the variant got, p = 2 * (1/2)^2 = 0.5
    assert rows[2][3:] == ["90.0% [69.9, 97.2] n=20", "+10.0 pts, p=0.5", "+0.0 pts, p=1", "+3.0%", "0.0300"]
    assert rows[1][4] == "-"
    assert (
        "- k=2: best task accuracy lopt-k2-lambda_aux (lambda_aux=1) with 90.0%, +10.0 points over the paper's "
        "setting (80.0%): not significant (p=0.5)."
    ) in sweep
    assert "- k=4: no knob beats the paper's setting (lopt-k4-paper, 50.0%)." in sweep


def test_study_report_needs_its_study_json(tmp_path):
    with pytest.raises(LoptError, match="study.json: no such file"):
        write_study_report(tmp_path)


def test_the_study_page_is_generated_between_its_markers_from_the_studys_report(study, tmp_path, capsys):
    page = tmp_path / "study.md"
    before, after = "# The study\n\nWhat it measures.\n", "\n## What it does not say\n\nOur own text.\n"
    page.write_text(f"{before}{BEGIN}\nhand-copied, stale\n{END}\n{after}")
    write_study_report(study)
    demo.main(["--output_dir", str(study), "--write_docs", str(page)])
    text = page.read_text()
    assert text.startswith(f"{before}{BEGIN}\n") and text.endswith(f"{END}\n{after}")  # the page's own text kept
    generated = text.split(BEGIN)[1].split(END)[0]
    assert "stale" not in generated and "## study" in generated and "### Conclusions" in generated
    assert "![" not in generated and "### Plots" not in generated  # the images stay in the study folder
    assert table(generated)["lopt-k2"][3] == "+25.0 pts, p=0.031"  # the report's own table, its cells unchanged
    assert f"wrote the report of {study} into {page}" in " ".join(capsys.readouterr().err.split())
    demo.main(["--output_dir", str(study), "--write_docs", str(page)])
    assert page.read_text().replace(generated, "") == text.replace(generated, "")  # a second write replaces, once


def test_the_study_page_must_have_its_markers_and_the_study_its_report(study, tmp_path):
    page = tmp_path / "study.md"
    page.write_text(f"# The study\n{END}\n{BEGIN}\n")
    write_study_report(study)
    with pytest.raises(LoptError, match="must have one line <!-- study-report:begin --> and, after it"):
        write_docs(page, study)
    page.write_text(f"{BEGIN}\n{END}\n")
    with pytest.raises(LoptError, match="report.md: no such file. Run `lopt demo --output_dir"):
        write_docs(page, tmp_path)
    with pytest.raises(LoptError, match="no such file; pass the page"):
        write_docs(tmp_path / "missing.md", study)


def row(name: str, per_problem: list[bool] | None = None, **measures) -> MethodRow:
    """A fabricated table row: accuracy from `per_problem`, any other measure as one seed's value."""
    values = {key: Measure([value]) for key, value in measures.items()}
    accuracy = Accuracy([sum(per_problem)], [len(per_problem)]) if per_problem else None
    return MethodRow(name=name, method=name, accuracy=accuracy, per_problem=per_problem, **values)


def test_conclusions_from_fabricated_numbers():
    rows = [
        row("base", BASE, second_change=0.0, perplexity_change=0.0, kl_to_base=0.0),
        row("e2e", E2E_42, second_change=-20.0, perplexity_change=0.10, kl_to_base=0.05, activation_mib=40.0,
            memory_mib=900.0),
        row("lopt-k2", LOPT, second_change=-5.0, perplexity_change=0.02, kl_to_base=0.02, activation_mib=10.0,
            memory_mib=900.0),
        row("kl-sft", KL_SFT, second_change=-5.0, perplexity_change=0.01, activation_mib=40.0, memory_mib=1000.0),
    ]  # fmt: skip
    rows[1].is_reference = True
    rows[0].setting = {"second task": "chain-sum"}
    assert conclusions(rows) == [
        "Best task accuracy: lopt-k2 with 80.0% [58.4, 91.9] n=20.",
        "lopt-k2's lead: vs kl-sft (60.0%): +20.0 points, not significant (p=0.12); vs e2e (50.0%): +30.0 points, "
        "significant (McNemar p=0.031); vs base (20.0%): +60.0 points, significant (McNemar p<0.001); 3 tests, not "
        "corrected for multiple comparisons.",
        "Keeps the chain-sum accuracy best (change vs the starting model; higher kept more): lopt-k2 and kl-sft tie "
        "at -5.0 points (then e2e -20.0 points).",
        "Keeps general-text perplexity best (change vs the starting model; lower kept more): kl-sft with +1.0% (then "
        "lopt-k2 +2.0%, e2e +10.0%).",
        "Moves least from the starting model (mean per-token KL on general text): lopt-k2 with 0.0200 (then e2e "
        "0.0500); not measured for kl-sft.",
        "Least activation memory (peak bytes saved for backward): lopt-k2 with 10.0 MiB (then e2e 40.0 MiB, kl-sft "
        "40.0 MiB).",
        "Least process memory (peak device memory, or peak RSS on CPU): e2e and lopt-k2 tie at 900 MiB (then kl-sft "
        "1000 MiB).",
    ]


def test_conclusions_say_what_is_missing_and_tie_on_accuracy():
    rows = [row("e2e", E2E_42), row("lopt-k2", E2E_43[:2] + E2E_42[2:]), row("lora")]
    rows[2].differences = ["problems 10 (reference 20)"]
    lines = conclusions(rows)
    assert lines[0] == (
        "lora is left out of the accuracy and retention comparisons: evaluated differently from the reference "
        "(problems 10 (reference 20))."
    )
    assert lines[1] == "Best task accuracy: e2e and lopt-k2 tie at 50.0%; compared below: e2e."
    assert lines[2] == "e2e's lead: vs lopt-k2 (50.0%): +0.0 points, not significant (p=1)."
    assert (
        "Moves least from the starting model (mean per-token KL on general text): not measured for any method." in lines
    )
    assert conclusions([row("e2e")])[0] == (
        "Task accuracy: not measured for any trained method (no eval.json holds a held-out accuracy)."
    )
    unpaired = conclusions([row("e2e", E2E_42), MethodRow("lora", accuracy=Accuracy([3], [10]))])
    assert unpaired[1] == (
        "e2e's lead: vs lora (30.0%): +20.0 points, no paired test (per-problem results missing, or not of the same "
        "problems)."
    )


def test_the_best_method_is_a_trained_one_and_is_compared_with_the_starting_model():
    # The starting model scores best here (a run that forgot the task): it is compared with, never named best.
    lines = conclusions([row("base", LOPT), row("e2e", E2E_42)])
    assert lines[0] == "Best task accuracy: e2e with 50.0% [29.9, 70.1] n=20."
    assert lines[1] == "e2e's lead: vs base (80.0%): -30.0 points, significant (McNemar p=0.031)."
