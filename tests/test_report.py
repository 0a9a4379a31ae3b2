"""`lopt report` on fabricated run folders: the files it writes and the numbers in its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lopt.cli import main
from lopt.errors import LoptError
from lopt.tools.report import load_run, write_report

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


def test_report_writes_markdown_html_and_plots_with_the_runs_numbers(runs, tmp_path):
    save_file({"w": torch.zeros(1000, 3), "b": torch.zeros(5)}, str(runs[0] / "model.safetensors"))  # counted
    out = tmp_path / "report"
    write_report(runs, out, title="study")
    for name in (
        "report.md",
        "report.html",
        "task_loss.png",
        "aux_loss.png",
        "throughput_memory.png",
        "accuracy_retention.png",
    ):
        assert (out / name).stat().st_size > 0, name
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in (out / "report.md").read_text().splitlines()
        if line.startswith("| ")
    }
    # run | method | k | steps | trained params | tokens/s | peak activation MiB | peak memory MiB | final loss |
    # accuracy | ppl | change
    assert rows["e2e"][1:] == [
        "e2e", "1", "10", "3,005", "85", "80.0", "900", "1.5000", "25.0% (2/8)", "20.60", "+3.0% |"
    ]  # fmt: skip
    assert rows["lopt-k2"][4] == "-"  # no model file saved in the folder
    assert rows["lopt-k2"][1:4] == ["lopt", "2", "10"] and rows["lopt-k2"][8:] == [
        "1.2345",
        "12.5% (1/8)",
        "20.20",
        "+1.0% |",
    ]
    assert rows["frozen-k2"][1] == "lopt-frozen" and rows["frozen-k2"][9:] == ["-", "-", "- |"]
    assert rows["base"][1:4] == ["base", "-", "-"] and rows["base"][9:] == ["0.0% (0/8)", "20.00", "+0.0% |"]
    page = (out / "report.html").read_text()
    assert "<td>12.5% (1/8)</td>" in page and 'src="accuracy_retention.png"' in page


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
