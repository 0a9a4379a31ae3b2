"""`lopt report` on fabricated run folders: the files it writes and the numbers in its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lopt.cli import main
from lopt.errors import LoptError
from lopt.runs import Run, load_run
from lopt.tools.report import write_report
from lopt.tools.reporting import curve

MiB = 2**20


def fake_run(
    folder: Path,
    args: dict | None,
    losses: list[float],
    aux: list[list[float]],
    evaluation: dict | None,
    tokens_per_s: float = 100.0,
    activation_mib: float = 10.0,
) -> Path:
    folder.mkdir(parents=True)
    if args is not None:
        (folder / "training_args.json").write_text(json.dumps(args))
        lines = [
            {
                "step": 5 * (i + 1),
                "epoch": 0.1 * (i + 1),
                "task_loss": loss,
                "aux_loss": aux[i],
                "lr": 5e-5,
                "lr_k1": 5e-5,
                "grad_norm": 1.0,
                "tokens_per_s": tokens_per_s + 10 * i,
                "peak_mem_bytes": 900 * MiB,
                "activation_peak_bytes": int(activation_mib * MiB) * (i + 1),
                "elapsed_s": 10.0 * (i + 1),
            }
            for i, loss in enumerate(losses)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation))
    return folder


def evaluation(correct: int, n: int, ppl: float, base: float) -> dict:
    return {
        "model": "m",
        "base_model": "smollm2-135m",
        "task": "gsm-symbolic",
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "perplexity": ppl,
        "base_perplexity": base,
        "retention_change": (ppl - base) / base,
        "retention_source": "book.txt",
        "retention_tokens": 4096,
    }


@pytest.fixture()
def runs(tmp_path) -> list[Path]:
    return [
        fake_run(
            tmp_path / "e2e",
            {"method": "e2e", "num_blocks": 2, "model_name_or_path": "smollm2-135m"},
            [2.0, 1.5],
            [[], []],
            evaluation(2, 8, 20.6, 20.0),
            tokens_per_s=80.0,
            activation_mib=40.0,
        ),
        fake_run(
            tmp_path / "lopt-k2",
            {"method": "ll", "num_blocks": 2, "model_name_or_path": "smollm2-135m"},
            [2.0, 1.2345],
            [[0.9], [0.5]],
            evaluation(1, 8, 20.2, 20.0),
        ),
        fake_run(
            tmp_path / "frozen-k2",
            {"method": "lopt", "num_blocks": 2, "early_blocks": "frozen", "model_name_or_path": "smollm2-135m"},
            [2.0, 1.9],
            [[], []],
            None,
        ),
        fake_run(tmp_path / "base", None, [], [], evaluation(0, 8, 20.0, 20.0)),
    ]


def report_rows(out: Path) -> dict[str, list[str]]:
    """report.md's table, each row's cells by run name (the last cell keeps the row's closing " |")."""
    return {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in (out / "report.md").read_text().splitlines()
        if line.startswith("| ")
    }


def test_report_writes_markdown_html_and_plots_with_the_runs_numbers(runs, tmp_path):
    save_file({"w": torch.zeros(1000, 3), "b": torch.zeros(5)}, str(runs[0] / "model.safetensors"))  # counted
    out = tmp_path / "report"
    write_report(runs, out, title="study")
    for name in ("report.md", "report.html", "training_sft.png", "throughput_memory.png", "accuracy_retention.png"):
        assert (out / name).stat().st_size > 0, name
    rows = report_rows(out)
    # run | method | k | steps | trained params | recipe | final training loss | final recipe metric | tokens/s |
    # peak activation MiB | peak memory MiB | task accuracy | evaluated on | perplexity | retention change
    # 2/8: p = 0.25, z^2 = 3.841459: center (0.25 + 0.2400912) / 1.4801824 = 0.3311034,
    # half 1.959964 * sqrt(0.0234375 + 0.0150057) / 1.4801824 = 0.2596001 -> [7.1, 59.1]
    assert rows["e2e"][1:] == [
        "e2e", "1", "10", "3,005", "sft", "1.5000", "-", "85", "80.0", "900", "25.0% [7.1, 59.1] n=8",
        "8 gsm-symbolic; ppl 4096 tokens", "20.60", "+3.0% |",
    ]  # fmt: skip
    assert rows["lopt-k2"][4] == "-"  # no model file saved in the folder
    assert rows["lopt-k2"][1:4] == ["lopt", "2", "10"] and rows["lopt-k2"][6] == "1.2345"
    assert rows["lopt-k2"][11:] == ["12.5% [2.2, 47.1] n=8", "8 gsm-symbolic; ppl 4096 tokens", "20.20", "+1.0% |"]
    assert rows["frozen-k2"][1] == "lopt-frozen" and rows["frozen-k2"][11:] == ["-", "-", "-", "- |"]
    assert rows["base"][1:8] == ["base", "-", "-", "-", "-", "-", "-"]
    assert rows["base"][11:] == ["0.0% [0.0, 32.4] n=8", "8 gsm-symbolic; ppl 4096 tokens", "20.00", "+0.0% |"]
    page = (out / "report.html").read_text()
    assert "<td>12.5% [2.2, 47.1] n=8</td>" in page and 'src="accuracy_retention.png"' in page


def test_rows_evaluated_differently_say_so_and_are_left_out_of_the_scatter(runs, tmp_path):
    e = evaluation(3, 20, 20.4, 20.0) | {"max_new_tokens": 64}  # 20 problems and a token limit, not 8 and none
    (runs[1] / "eval.json").write_text(json.dumps(e))
    out = tmp_path / "report"
    write_report(runs, out)
    rows = report_rows(out)
    assert rows["lopt-k2"][12] == "⚠ 20 gsm-symbolic, ≤64 new tokens; ppl 4096 tokens"
    assert rows["base"][12] == "8 gsm-symbolic; ppl 4096 tokens"  # as e2e, the first evaluated row
    text = (out / "report.md").read_text()
    assert (
        "⚠ lopt-k2 was evaluated differently from e2e (the first evaluated row): problems 20 (reference 8); max new "
        "tokens 64 (reference not recorded). Its accuracy and retention are not comparable with e2e's."
    ) in text
    assert "left out, evaluated differently: lopt-k2" in text  # the accuracy-retention plot's caption


def recipe_run(folder: Path, recipe_columns: dict, args: dict, steps: int = 4) -> Path:
    """A GRPO or DPO run folder: the common metrics columns, then the recipe's own."""
    folder.mkdir(parents=True)
    (folder / "training_args.json").write_text(json.dumps({"model_name_or_path": "smollm2-135m", **args}))
    rows = [
        {"step": i + 1, "task_loss": 0.1 * i, "aux_loss": [0.2], "tokens_per_s": 50.0, "peak_mem_bytes": MiB,
         "activation_peak_bytes": MiB, **{key: value * (i + 1) for key, value in recipe_columns.items()}}
        for i in range(steps)
    ]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_each_recipe_has_its_own_column_value_and_plot(runs, tmp_path):
    grpo = recipe_run(tmp_path / "grpo", {"reward": 0.1, "reward_std": 0.1, "completion_length": 10.0,
                                          "step_time_s": 1.0}, {"method": "lopt", "loss_type": "dapo"})  # fmt: skip
    dpo = recipe_run(tmp_path / "dpo", {"reward_accuracy": 0.2, "reward_margin": 0.1, "reward_chosen": 0.1,
                                        "reward_rejected": 0.0}, {"method": "lopt", "beta": 0.1})  # fmt: skip
    out = tmp_path / "report"
    write_report([runs[0], grpo, dpo], out)
    rows = report_rows(out)
    assert rows["grpo"][5:8] == ["grpo", "0.3000", "reward 0.400"]  # the last logged step's loss and reward
    assert rows["dpo"][5:8] == ["dpo", "0.3000", "reward accuracy 80.0%"]
    assert rows["e2e"][5:8] == ["sft", "1.5000", "-"]
    for recipe in ("sft", "grpo", "dpo"):  # one figure each: their losses are different objectives
        assert (out / f"training_{recipe}.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "GRPO runs: every logged step of the task loss, each LoPT block's local loss (log scale), the reward" in text
    assert "compare it only between rows of the same recipe" in text
    assert (
        "SFT runs: every logged step of the task loss; drawn as points, too few logged steps for a curve: e2e (2)"
        in (text)
    )


def test_curves_draw_every_logged_point_and_a_resumed_run_keeps_its_later_rows(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Run(name="r", metrics=[{"step": s, "task_loss": float(s)} for s in (1, 2, 3, 4)])
    run.metrics += [{"step": 3, "task_loss": 30.0}, {"step": 4, "task_loss": 40.0}, {"step": 5, "task_loss": 50.0}]
    assert run.series("task_loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    fig, ax = plt.subplots()
    line = curve(ax, run.series("task_loss"))
    assert list(line.get_xdata()) == [1, 2, 3, 4, 5] and line.get_linestyle() == "-"
    assert curve(ax, run.series("task_loss")[:2]).get_linestyle() == "None"  # two points: no line through them
    plt.close(fig)


def test_report_html_renders_markdown_and_table_cells_cannot_break_the_table(runs, tmp_path):
    odd = tmp_path / "a|b<script>"
    odd.mkdir()
    (odd / "eval.json").write_text(json.dumps(evaluation(1, 8, 20.0, 20.0)))
    empty = tmp_path / "no-eval"
    fake_run(empty, {"method": "e2e"}, [1.0], [[]], None)
    out = tmp_path / "report"
    write_report([odd, empty], out)
    assert "| a\\|b&lt;script> | base |" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "<td>a|b&lt;script&gt;</td>" in page and "<script>" not in page
    assert "`" not in page and "<table>" in page
    write_report([empty], out)  # nothing evaluated: the note names the command, as code
    assert "<code>lopt eval RUN_DIR</code>" in (out / "report.html").read_text()


def test_report_cli_and_its_errors(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "r2")]) == 2
    assert "has none of training_args.json, metrics.jsonl, eval.json" in capsys.readouterr().err
    (runs[0] / "eval.json").write_text("{broken")
    with pytest.raises(LoptError, match="eval.json: not valid JSON"):
        load_run(runs[0])
