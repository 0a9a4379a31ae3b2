"""`lopt report RUN_DIR... --out DIR`: one comparison table and plots for a set of runs.

It reads only the files a run leaves in its folder (training_args.json, metrics.jsonl, eval.json),
so runs made on another machine can be compared here. A folder with only an eval.json (a starting
model that was evaluated, as the demo does) appears as a "base" row without training columns.
Each row says what it was evaluated on; a row evaluated differently from the first evaluated one is
flagged, not mixed in. Losses of different recipes (SFT, GRPO, DPO, ...) are different objectives:
each recipe gets its own plot. Writes report.md, report.html and PNG plots into --out.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from lopt.evaluation.statistics import wilson_interval
from lopt.recipes.registry import Headline, recipe_record
from lopt.runs import Run, load_run
from lopt.tools.reporting import (
    MIN_CURVE_POINTS,
    MiB,
    accuracy_cell,
    curve,
    describe_setting,
    evaluation_setting,
    markdown_to_html,
    md_table,
    md_text,
    mib,
    number,
    setting_differences,
)


def _headline(recipe: str | None) -> Headline | None:
    """The recipe's own column that says how training went (its registry record's), if it has one."""
    record = recipe_record(recipe)
    return record.headline if record else None


def _loss(recipe: str) -> str:
    """What the recipe's task_loss is: the same column holds different objectives."""
    record = recipe_record(recipe)
    return record.loss if record else recipe


COLUMNS = (
    "run",
    "method",
    "k",
    "steps",
    "trained params",
    "recipe",
    "final training loss",
    "final recipe metric",
    "tokens/s",
    "peak activation MiB",
    "peak memory MiB",
    "task accuracy",
    "evaluated on",
    "perplexity",
    "retention change",
)


def _reference_run(runs: list[Run]) -> Run | None:
    """The first evaluated run: the others' evaluation settings are checked against its."""
    return next((r for r in runs if r.evaluation), None)


def differences(run: Run, runs: list[Run]) -> list[str]:
    """How `run` was evaluated differently from the first evaluated run (empty: comparable, or not evaluated)."""
    reference = _reference_run(runs)
    if not run.evaluation or reference is None or reference is run:
        return []
    return setting_differences(evaluation_setting(run.evaluation), evaluation_setting(reference.evaluation))


def _recipe_metric(run: Run) -> str:
    headline = _headline(run.recipe)
    value = run.last(headline.column) if headline else None
    return "-" if value is None else f"{headline.label} {value:{headline.spec}}"


def _task_accuracy(e: dict) -> str:
    # a reward model's eval.json holds its pairwise accuracy on preference pairs; its setting says so
    if "accuracy" not in e and "pairwise_accuracy" not in e:
        return "-"
    return accuracy_cell(e["correct"], e["n"])


def table_rows(runs: list[Run]) -> list[list[str]]:
    """The comparison table's cells, one list per run in COLUMNS order."""
    rows = []
    for run in runs:
        e = run.evaluation
        evaluated_on = describe_setting(evaluation_setting(e)) if e else "-"
        rows.append(
            [
                run.name,
                run.method,
                number(run.blocks, "d"),
                number(run.last("step"), "d"),
                number(run.trained_parameters, ","),
                run.recipe or "-",
                number(run.last("task_loss"), ".4f"),
                _recipe_metric(run),
                number(run.mean("tokens_per_s"), ".0f"),
                number(mib(run.peak("activation_peak_bytes")), ".1f"),
                number(mib(run.peak("peak_mem_bytes")), ".0f"),
                _task_accuracy(e),
                ("⚠ " if differences(run, runs) else "") + evaluated_on,
                number(e.get("perplexity"), ".2f"),
                number(e.get("retention_change"), "+.1%"),
            ]
        )
    return rows


def markdown_table(runs: list[Run]) -> list[str]:
    """The comparison table in Markdown."""
    return md_table(COLUMNS, table_rows(runs))


def table_notes(runs: list[Run]) -> list[str]:
    """What the table's columns cannot say themselves: rows not comparable, losses that are different objectives."""
    notes = []
    reference = _reference_run(runs)
    for run in runs:
        found = differences(run, runs)
        if found:
            notes.append(
                f"⚠ {run.name} was evaluated differently from {reference.name} (the first evaluated row): "
                f"{'; '.join(found)}. Its accuracy and retention are not comparable with {reference.name}'s."
            )
    recipes = sorted({r.recipe for r in runs if r.recipe})
    if len(recipes) > 1:
        notes.append(
            "The final training loss is each recipe's own objective ("
            + "; ".join(_loss(r) for r in recipes)
            + "): compare it only between rows of the same recipe."
        )
    return notes


def _short_runs(runs: list[Run], key: str) -> str:
    short = [f"{r.name} ({len(r.series(key))})" for r in runs if 0 < len(r.series(key)) < MIN_CURVE_POINTS]
    if not short:
        return ""
    return (
        f"; drawn as points, too few logged steps for a curve: {', '.join(short)} (log more often with --logging_steps)"
    )


def _training_plot(plt, runs: list[Run], recipe: str):
    """The figure of one recipe's runs: task loss (validation dashed), local losses per block, the recipe's metric."""
    metric = _headline(recipe)
    local = [r for r in runs if any(v for _, v in r.series("aux_loss"))]
    rewarded = [r for r in runs if metric and r.series(metric.column)]
    panels = 1 + bool(local) + bool(rewarded)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax = axes.pop(0)
    for run in runs:
        line = curve(ax, run.series("task_loss"), label=run.name)
        if run.series("eval_task_loss"):  # --eval_*: the validations, in the run's colour
            curve(ax, run.series("eval_task_loss"), linestyle="--", marker="x", color=line.get_color(),
                  label=f"{run.name} (validation)")  # fmt: skip
    ax.set(xlabel="step", ylabel="task loss", title=_loss(recipe))
    ax.legend(fontsize="small")
    if local:
        ax = axes.pop(0)
        for run in local:
            points = run.series("aux_loss")
            for block in range(max(len(v) for _, v in points)):
                # a block's value may be missing (null) in a row; the log axis also needs it positive
                block_points = [(s, v[block]) for s, v in points if len(v) > block and v[block] and v[block] > 0]
                if block_points:
                    curve(ax, block_points, marker=".", label=f"{run.name} block {block + 1}")
        ax.set(xlabel="step", ylabel="local reconstruction loss", title="Local loss per block", yscale="log")
        ax.legend(fontsize="small")
    if rewarded:
        key, label = metric.column, metric.label
        ax = axes.pop(0)
        for run in rewarded:
            curve(ax, run.series(key), label=run.name)
        ax.set(xlabel="step", ylabel=label, title=label.capitalize())
        ax.legend(fontsize="small")
    caption = (
        f"{recipe.upper()} runs: every logged step of the task loss"
        + (" (dashed: validation)" if any(r.series("eval_task_loss") for r in runs) else "")
        + (", each LoPT block's local loss (log scale)" if local else "")
        + (f", the {metric.label}" if rewarded else "")
        + _short_runs(runs, "task_loss")
    )
    return fig, caption


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
    for recipe in sorted({r.recipe for r in trained}):  # one figure per recipe: their losses are different objectives
        fig, caption = _training_plot(plt, [r for r in trained if r.recipe == recipe], recipe)
        save(fig, f"training_{recipe}.png", caption)

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
    comparable = [r for r in evaluated if not differences(r, runs)]
    if comparable:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for run in comparable:
            e = run.evaluation
            x, y = 100 * e["retention_change"], 100 * e["accuracy"]
            low, high = wilson_interval(e["correct"], e["n"])
            ax.errorbar(x, y, yerr=[[max(0.0, y - 100 * low)], [max(0.0, 100 * high - y)]], fmt="o", capsize=3)
            ax.annotate(run.name, (x, y), textcoords="offset points", xytext=(5, 5))
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set(
            xlabel="perplexity change vs starting model (%; lower kept more)",
            ylabel="task accuracy (%)",
            title="Accuracy vs retention",
        )
        left_out = [r.name for r in evaluated if r not in comparable]
        save(
            fig,
            "accuracy_retention.png",
            "Task accuracy (95% Wilson interval) against the change of general-text perplexity"
            + (f"; left out, evaluated differently: {', '.join(left_out)}" if left_out else ""),
        )
    return plots


def _eval_note(runs: list[Run]) -> str:
    if not any(r.evaluation for r in runs):
        return "No run has an eval.json: run `lopt eval RUN_DIR` for accuracy and retention."
    return (
        "Task accuracy: greedy answers to held-out problems, final answer exact match, with its 95% Wilson interval "
        "and the number of problems n; the evaluated-on column says on what each row was measured (problems, task, "
        "new-token limit, perplexity tokens). Retention change is the perplexity change on general text relative "
        "to each run's starting model (positive: the model got worse on general text). Rows marked ⚠ were "
        "evaluated differently from the first evaluated row and are not comparable with it."
    )


def report_markdown(title: str, runs: list[Run], plots: list[tuple[str, str]]) -> str:
    lines = [
        f"# {md_text(title)}",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {md_text(', '.join(r.name for r in runs))}.",
        "",
        _eval_note(runs),
        "",
        *markdown_table(runs),
    ]
    for note in table_notes(runs):
        lines += ["", md_text(note)]
    for name, caption in plots:
        lines += ["", f"![{md_text(caption)}]({name})", "", f"*{md_text(caption)}*"]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out: Path, title: str = "lopt report") -> list[Run]:
    runs = [load_run(Path(d)) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(runs, out)
    text = report_markdown(title, runs, plots)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(markdown_to_html(title, text))
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
