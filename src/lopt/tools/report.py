"""`lopt report RUN_DIR... --out DIR`: one comparison table and plots for a set of runs.

It reads only the files a run leaves in its folder (training_args.json, metrics.jsonl, eval.json),
so runs made on another machine can be compared here. A folder with only an eval.json (a starting
model that was evaluated, as the demo does) appears as a "base" row without training columns.
Writes report.md, report.html and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lopt.config import METHODS
from lopt.errors import LoptError
from lopt.models.lora import saved_parameters

RUN_FILES = ("training_args.json", "metrics.jsonl", "eval.json")
MiB = 2**20


@dataclass
class Run:
    name: str
    args: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
    trained_parameters: int | None = None  # the adapter's (LoRA), or the saved model's (full training)

    @property
    def method(self) -> str:
        if not self.args:
            return "base"
        method = METHODS.get(self.args.get("method", ""), self.args.get("method", "?"))
        method = "lopt-frozen" if method == "lopt" and self.args.get("early_blocks") == "frozen" else method
        return method + ("+lora" if self.args.get("use_peft") else "") + ("+kl" if self.args.get("kl_beta") else "")

    @property
    def blocks(self) -> int | None:
        if not self.args:
            return None
        return 1 if self.method == "e2e" else self.args.get("num_blocks")

    def last(self, key: str):
        values = self.series(key)
        return values[-1][1] if values else None

    def series(self, key: str) -> list[tuple[int, object]]:
        return [(m["step"], m[key]) for m in self.metrics if m.get(key) is not None]

    def mean(self, key: str) -> float | None:
        values = [v for _, v in self.series(key)]
        return sum(values) / len(values) if values else None

    def peak(self, key: str) -> float | None:
        values = [v for _, v in self.series(key)]
        return max(values) if values else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LoptError(
            f"{path}: not valid JSON ({error}); re-create it by re-running the run or `lopt eval`."
        ) from None


def load_run(folder: Path) -> Run:
    if not folder.is_dir():
        raise LoptError(f"RUN_DIR {folder}: no such folder; pass the --output_dir of a run.")
    if not any((folder / name).is_file() for name in RUN_FILES):
        raise LoptError(f"RUN_DIR {folder}: has none of {', '.join(RUN_FILES)}; pass the --output_dir of a run.")
    run = Run(name=folder.name)
    if (folder / "training_args.json").is_file():
        run.args = _read_json(folder / "training_args.json")
    if (folder / "metrics.jsonl").is_file():
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        try:
            run.metrics = [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as error:
            raise LoptError(f"{folder / 'metrics.jsonl'}: a line is not valid JSON ({error}).") from None
    if (folder / "eval.json").is_file():
        run.evaluation = _read_json(folder / "eval.json")
    if run.args and not run.method.startswith("lopt-frozen"):  # the frozen ablation trains part of what it saves
        run.trained_parameters = saved_parameters(folder) or None
    return run


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MiB


COLUMNS = (
    "run",
    "method",
    "k",
    "steps",
    "trained params",
    "tokens/s",
    "peak activation MiB",
    "peak memory MiB",
    "final task loss",
    "task accuracy",
    "perplexity",
    "retention change",
)


def table_rows(runs: list[Run]) -> list[list[str]]:
    """The comparison table's cells, one list per run in COLUMNS order."""
    rows = []
    for run in runs:
        e = run.evaluation
        accuracy = f"{e['accuracy']:.1%} ({e['correct']}/{e['n']})" if "accuracy" in e else "-"
        rows.append(
            [
                run.name,
                run.method,
                _number(run.blocks, "d"),
                _number(run.last("step"), "d"),
                _number(run.trained_parameters, ","),
                _number(run.mean("tokens_per_s"), ".0f"),
                _number(_mib(run.peak("activation_peak_bytes")), ".1f"),
                _number(_mib(run.peak("peak_mem_bytes")), ".0f"),
                _number(run.last("task_loss"), ".4f"),
                accuracy,
                _number(e.get("perplexity"), ".2f"),
                _number(e.get("retention_change"), "+.1%"),
            ]
        )
    return rows


def markdown_table(runs: list[Run]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return lines + ["| " + " | ".join(row) + " |" for row in table_rows(runs)]


def make_plots(runs: list[Run], out: Path) -> list[tuple[str, str]]:
    """Write the PNG plots; returns (file name, caption) of those that had data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    plots = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        plots.append((name, caption))

    trained = [r for r in runs if r.series("task_loss")]
    if trained:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for run in trained:
            steps, losses = zip(*run.series("task_loss"), strict=True)
            (line,) = ax.plot(steps, losses, marker="o", label=run.name)
            if run.series("eval_task_loss"):  # --eval_*: the validations, in the run's colour
                steps, losses = zip(*run.series("eval_task_loss"), strict=True)
                ax.plot(steps, losses, "--x", color=line.get_color(), label=f"{run.name} (validation)")
        ax.set(xlabel="step", ylabel="task loss", title="Task loss")
        ax.legend()
        validated = any(run.series("eval_task_loss") for run in trained)
        save(fig, "task_loss.png", "Task loss per logged step" + (" (dashed: validation)" if validated else ""))

    aux = [r for r in runs if any(v for _, v in r.series("aux_loss"))]
    if aux:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for run in aux:
            steps, values = zip(*run.series("aux_loss"), strict=True)
            for block in range(len(values[-1])):
                ax.plot(steps, [v[block] for v in values], marker=".", label=f"{run.name} block {block + 1}")
        ax.set(xlabel="step", ylabel="local reconstruction loss", title="Auxiliary loss per block")
        ax.legend()
        save(fig, "aux_loss.png", "Local (auxiliary) loss of each non-final block")

    bars = [
        (key, label, scale)
        for key, label, scale in (
            ("tokens_per_s", "tokens/s (mean)", 1.0),
            ("activation_peak_bytes", "peak activation MiB", 1 / MiB),
            ("peak_mem_bytes", "peak memory MiB", 1 / MiB),
        )
        if any(r.series(key) for r in runs)
    ]
    if bars:
        fig, axes = plt.subplots(1, len(bars), figsize=(4 * len(bars), 3.6), squeeze=False)
        for ax, (key, label, scale) in zip(axes[0], bars, strict=True):
            names = [r.name for r in runs if r.series(key)]
            values = [(r.mean(key) if key == "tokens_per_s" else r.peak(key)) * scale for r in runs if r.series(key)]
            ax.bar(names, values)
            ax.set_title(label)
            ax.tick_params(axis="x", rotation=30)
        save(fig, "throughput_memory.png", "Throughput and peak memory")

    evaluated = [r for r in runs if "accuracy" in r.evaluation and "retention_change" in r.evaluation]
    if evaluated:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for run in evaluated:
            x, y = 100 * run.evaluation["retention_change"], 100 * run.evaluation["accuracy"]
            ax.scatter(x, y)
            ax.annotate(run.name, (x, y), textcoords="offset points", xytext=(5, 5))
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set(
            xlabel="perplexity change vs starting model (%; lower kept more)",
            ylabel="task accuracy (%)",
            title="Accuracy vs retention",
        )
        save(fig, "accuracy_retention.png", "Task accuracy against the change of general-text perplexity")
    return plots


def _eval_note(runs: list[Run]) -> str:
    e = next((r.evaluation for r in runs if r.evaluation), None)
    if not e:
        return "No run has an eval.json: run `lopt eval RUN_DIR` for accuracy and retention."
    parts = []
    if "task" in e:
        parts.append(
            f"Task accuracy: greedy answers to {e['n']} held-out {e['task']} problems, final answer exact match."
        )
    if "retention_source" in e:
        parts.append(
            f"Perplexity on {e['retention_tokens']} tokens of {e['retention_source']}; retention change is "
            "relative to each run's starting model (positive: the model got worse on general text)."
        )
    return " ".join(parts)


def write_markdown(path: Path, title: str, runs: list[Run], plots: list[tuple[str, str]]) -> None:
    lines = [
        f"# {title}",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {', '.join(r.name for r in runs)}.",
        "",
        _eval_note(runs),
        "",
        *markdown_table(runs),
    ]
    for name, caption in plots:
        lines += ["", f"![{caption}]({name})"]
    path.write_text("\n".join(lines) + "\n")


def write_html(path: Path, title: str, runs: list[Run], plots: list[tuple[str, str]]) -> None:
    esc = html.escape
    header = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>\n" for row in table_rows(runs))
    figures = "".join(
        f'<figure><img src="{esc(name)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>\n'
        for name, caption in plots
    )
    path.write_text(
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>\n'
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>\n"
        f"<h1>{esc(title)}</h1>\n<p>{esc(_eval_note(runs))}</p>\n"
        f"<table><tr>{header}</tr>\n{body}</table>\n{figures}</body></html>\n"
    )


def write_report(run_dirs: list[Path], out: Path, title: str = "lopt report") -> list[Run]:
    runs = [load_run(Path(d)) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(runs, out)
    write_markdown(out / "report.md", title, runs, plots)
    write_html(out / "report.html", title, runs, plots)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lopt report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (their --output_dir)")
    parser.add_argument("--out", required=True, help="folder for report.md, report.html and the plots")
    parser.add_argument("--title", default="lopt report")
    args = parser.parse_args(argv)
    out = Path(args.out)
    write_report([Path(r) for r in args.runs], out, args.title)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}")
