"""The report of a study (`lopt demo`): several methods trained on one task, each saved model and the starting model
evaluated on the same held-out problems.

It reads the study folder: study.json (the title, the task, the reference method, the settings, and the runs: the
method name, seed and folder of each) and each run's folder as `lopt report` reads it (training_args.json,
metrics.jsonl, eval.json). One table row per method, its seeds aggregated; every row's evaluation setting is
checked against the reference's, and a row evaluated differently is flagged, never mixed in. The conclusions are
generated from the numbers only. Writes report.md, report.html and PNG plots into the study folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lopt.errors import LoptError
from lopt.evaluation.statistics import mcnemar_exact, mean_std, wilson_interval
from lopt.runs import Run, load_run, read_json
from lopt.tools.report import (
    MiB,
    curve,
    evaluation_setting,
    markdown_to_html,
    md_table,
    md_text,
    setting_differences,
)

STUDY_FILE = "study.json"
BASE = "base"  # study.json's method of the starting model
SIGNIFICANCE = 0.05  # McNemar p below this: a difference in accuracy the problems support


@dataclass
class Measure:
    """One number of a method, one value per seed."""

    values: list[float]

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        """The spread over seeds; None with one seed (no spread to tell)."""
        return mean_std(self.values)[1] if len(self.values) > 1 else None


@dataclass
class Accuracy:
    """A method's accuracy on one task: correct answers and problems of each seed."""

    correct: list[int]
    n: list[int]

    @property
    def measure(self) -> Measure:
        return Measure([c / n if n else 0.0 for c, n in zip(self.correct, self.n, strict=True)])

    @property
    def mean(self) -> float:
        return self.measure.mean

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy pooled over the seeds."""
        return wilson_interval(sum(self.correct), sum(self.n))


@dataclass
class MethodRow:
    """One method of the study, its seeds aggregated: the table's row and what the conclusions reason on."""

    name: str
    method: str = ""
    seeds: list[int] = field(default_factory=list)
    accuracy: Accuracy | None = None
    per_problem: list[bool] | None = None  # the first seed's correctness, problem by problem: for paired tests
    p_vs_reference: float | None = None  # exact McNemar on the first seeds' per-problem results
    second_accuracy: Accuracy | None = None
    second_per_problem: list[bool] | None = None  # the first seed's second-task correctness
    second_change: Measure | None = None  # second-task accuracy minus the starting model's, in points
    second_p_vs_base: float | None = None  # exact McNemar of that change, on the first seed
    perplexity_change: Measure | None = None  # relative, +0.05: 5% worse than the starting model
    kl_to_base: Measure | None = None
    trainable_parameters: int | None = None
    tokens_per_s: Measure | None = None
    activation_mib: Measure | None = None
    memory_mib: Measure | None = None
    setting: dict = field(default_factory=dict)  # what it was evaluated on (report.evaluation_setting)
    differences: list[str] = field(default_factory=list)  # how that differs from the reference's; empty: comparable
    is_reference: bool = False

    @property
    def is_base(self) -> bool:
        return self.method == BASE


Group = list[tuple[dict, Run]]  # a method's study.json entries with their loaded runs, seed by seed


def load_study(out: Path) -> tuple[dict, dict[str, Group]]:
    """study.json and each method's runs, in study.json's order."""
    path = out / STUDY_FILE
    if not path.is_file():
        raise LoptError(f"{path}: no such file; `lopt demo` writes it next to the study's run folders.")
    study = read_json(path)
    if not study.get("runs"):
        raise LoptError(f"{path}: lists no runs; re-run `lopt demo`.")
    groups: dict[str, Group] = {}
    for entry in study["runs"]:
        groups.setdefault(entry["name"], []).append((entry, load_run(out / entry["dir"])))
    return study, groups


def _measure(values: list[float | None], scale: float = 1.0) -> Measure | None:
    present = [v * scale for v in values if v is not None]
    return Measure(present) if present else None


def _accuracy(scores: list[dict | None]) -> Accuracy | None:
    scored = [s for s in scores if s and "correct" in s and "n" in s]
    return Accuracy([s["correct"] for s in scored], [s["n"] for s in scored]) if scored else None


def _paired_p(a: list[bool] | None, b: list[bool] | None) -> float | None:
    """Exact McNemar p of two per-problem results; None where one is missing or they are not the same problems."""
    if not a or not b or len(a) != len(b):
        return None
    return mcnemar_exact(a, b).p_value


def _row(name: str, group: Group) -> MethodRow:
    evaluations = [run.evaluation for _, run in group]
    first = evaluations[0]
    return MethodRow(
        name=name,
        method=group[0][0].get("method", ""),
        seeds=[entry["seed"] for entry, _ in group if entry.get("seed") is not None],
        accuracy=_accuracy(evaluations),
        per_problem=first.get("per_problem"),
        second_accuracy=_accuracy([e.get("second_task") for e in evaluations]),
        second_per_problem=(first.get("second_task") or {}).get("per_problem"),
        perplexity_change=_measure([e.get("retention_change") for e in evaluations]),
        kl_to_base=_measure([e.get("kl_to_base") for e in evaluations]),
        trainable_parameters=group[0][1].trained_parameters,
        tokens_per_s=_measure([run.mean("tokens_per_s") for _, run in group]),
        activation_mib=_measure([run.peak("activation_peak_bytes") for _, run in group], 1 / MiB),
        memory_mib=_measure([run.peak("peak_mem_bytes") for _, run in group], 1 / MiB),
        setting=evaluation_setting(first) if first else {},
    )


def method_rows(study: dict, groups: dict[str, Group]) -> list[MethodRow]:
    """The table's rows: one per method, compared with the reference (study.json's, else the first evaluated)."""
    rows = [_row(name, group) for name, group in groups.items()]
    reference = next((r for r in rows if r.name == study.get("reference") and r.setting), None)
    reference = reference or next((r for r in rows if r.setting), None)
    base = next((r for r in rows if r.is_base), None)
    for row, group in zip(rows, groups.values(), strict=True):
        if reference is not None:
            row.is_reference = row is reference
            # every seed's evaluation is checked: one seed evaluated differently makes the row's numbers a mix; a
            # seed without an eval.json has no numbers to mix (its measures read "not measured")
            seen = [
                setting_differences(evaluation_setting(run.evaluation), reference.setting)
                for _, run in group
                if run.evaluation
            ]
            row.differences = list(dict.fromkeys(d for found in seen for d in found))
            if not row.is_reference:
                row.p_vs_reference = _paired_p(row.per_problem, reference.per_problem)
        if base is not None and base.second_accuracy is not None and row.second_accuracy is not None:
            row.second_change = Measure(
                [100 * (v - base.second_accuracy.mean) for v in row.second_accuracy.measure.values]
            )
            if not row.is_base:
                row.second_p_vs_base = _paired_p(row.second_per_problem, base.second_per_problem)
    return rows


# --- the table


def _with_spread(measure: Measure | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if measure is None:
        return "-"
    text = f"{measure.mean * scale:{spec}}{unit}"
    if measure.std is not None:
        text += f" ± {measure.std * scale:{spec.replace('+', '')}}{unit}"
    return text


def accuracy_text(accuracy: Accuracy | None) -> str:
    """An accuracy cell, "62.5% [55.6, 68.9] n=200"; over seeds "62.5% ± 1.2 [58.1, 66.7] n=3×200": the mean ± std
    over seeds (points), the interval of the accuracy pooled over them."""
    if accuracy is None:
        return "-"
    low, high = accuracy.interval
    seeds = len(accuracy.n)
    if seeds == 1:
        n = str(accuracy.n[0])
    else:
        n = f"{seeds}×{accuracy.n[0]}" if len(set(accuracy.n)) == 1 else "+".join(map(str, accuracy.n))
    spread = f" ± {100 * accuracy.measure.std:.1f}" if seeds > 1 else ""
    return f"{accuracy.mean:.1%}{spread} [{100 * low:.1f}, {100 * high:.1f}] n={n}"


def p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def _delta_cell(row: MethodRow, reference: MethodRow | None) -> str:
    if row.is_reference or reference is None or reference.accuracy is None or row.accuracy is None:
        return "-"
    if row.differences:
        return "not comparable"
    return _accuracy_delta(row, reference, row.p_vs_reference)


def _accuracy_delta(row: MethodRow, other: MethodRow, p: float | None) -> str:
    """A cell: row's accuracy minus other's, in points, with the paired test's p."""
    delta = f"{100 * (row.accuracy.mean - other.accuracy.mean):+.1f} pts"
    return delta + (f", {p_text(p)}" if p is not None else ", no paired test")


def _second_change_cell(row: MethodRow) -> str:
    text = _with_spread(row.second_change, "+.1f", unit=" pts")
    return text + (f", {p_text(row.second_p_vs_base)}" if row.second_p_vs_base is not None else "")


def table_header(study: dict, rows: list[MethodRow]) -> list[str]:
    reference = next((r.name for r in rows if r.is_reference), "reference")
    second = study.get("second_task") or "second task"
    return [
        "method", "seeds", f"task accuracy ({study.get('task', 'task')})", f"Δ vs {reference} (McNemar)",
        f"{second} accuracy", f"{second} Δ vs base (McNemar)", "perplexity change vs start", "KL to start",
        "trainable params", "tokens/s", "peak activation MiB", "peak memory MiB",
    ]  # fmt: skip


def table_rows(rows: list[MethodRow]) -> list[list[str]]:
    """The table's cells, one list per method in table_header's order."""
    reference = next((r for r in rows if r.is_reference), None)
    return [
        [
            row.name + (" ⚠" if row.differences else ""),
            ", ".join(map(str, row.seeds)) or "-",
            accuracy_text(row.accuracy),
            _delta_cell(row, reference),
            accuracy_text(row.second_accuracy),
            _second_change_cell(row),
            _with_spread(row.perplexity_change, "+.1f", 100, "%"),
            _with_spread(row.kl_to_base, ".4f"),
            "-" if row.trainable_parameters is None else f"{row.trainable_parameters:,}",
            _with_spread(row.tokens_per_s, ".0f"),
            _with_spread(row.activation_mib, ".1f"),
            _with_spread(row.memory_mib, ".0f"),
        ]
        for row in rows
    ]


def markdown_table(study: dict, rows: list[MethodRow]) -> list[str]:
    """The study's table in Markdown (what `lopt demo` prints)."""
    return md_table(table_header(study, rows), table_rows(rows))


def _flag_notes(rows: list[MethodRow]) -> list[str]:
    reference = next((r.name for r in rows if r.is_reference), "the reference")
    return [
        f"⚠ {row.name} was evaluated differently from {reference}: {'; '.join(row.differences)}. Its numbers are not "
        f"comparable with {reference}'s: no Δ, and left out of the accuracy-retention plot and of the accuracy and "
        "retention conclusions."
        for row in rows
        if row.differences
    ]


# --- the conclusions


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _ranking(
    label: str,
    rows: list[MethodRow],
    value: Callable[[MethodRow], float | None],
    lower_is_better: bool,
    show: Callable[[float], str],
) -> str:
    """Which rows are best on one measure, the others after them, the rows without it. Values that show the same
    (at the table's precision) tie: the measurement does not tell them apart."""
    measured = sorted(
        ((row, value(row)) for row in rows if value(row) is not None),
        key=lambda item: item[1],
        reverse=not lower_is_better,
    )
    missing = [row.name for row in rows if value(row) is None]
    if not measured:
        return f"{label}: not measured for any method."
    best = show(measured[0][1])
    winners = [row.name for row, v in measured if show(v) == best]
    others = [f"{row.name} {show(v)}" for row, v in measured if show(v) != best]
    text = f"{label}: " + (f"{_names(winners)} tie at {best}" if len(winners) > 1 else f"{winners[0]} with {best}")
    text += f" (then {', '.join(others)})" if others else ""
    text += f"; not measured for {_names(missing)}" if missing else ""
    return text + "."


def _verdict(p: float | None) -> str:
    """What a paired test says about a difference in accuracy."""
    if p is None:
        return "no paired test (per-problem results missing, or not of the same problems)"
    return f"significant (McNemar {p_text(p)})" if p < SIGNIFICANCE else f"not significant ({p_text(p)})"


def _accuracy_conclusions(rows: list[MethodRow]) -> list[str]:
    # The best trained method, compared with every other row, the starting model included (did it learn at all?).
    measured = sorted((r for r in rows if r.accuracy is not None and not r.is_base), key=lambda r: -r.accuracy.mean)
    missing = [r.name for r in rows if r.accuracy is None]
    lines = []
    if not measured:
        return ["Task accuracy: not measured for any trained method (no eval.json holds a held-out accuracy)."]
    best = measured[0]
    measured += [r for r in rows if r.accuracy is not None and r.is_base]
    tied = [r.name for r in measured if f"{r.accuracy.mean:.1%}" == f"{best.accuracy.mean:.1%}"]
    if len(tied) > 1:
        lines.append(
            f"Best task accuracy: {_names(tied)} tie at {best.accuracy.mean:.1%}; compared below: {best.name}."
        )
    else:
        lines.append(f"Best task accuracy: {best.name} with {accuracy_text(best.accuracy)}.")
    comparisons = []
    for other in measured[1:]:
        gap = 100 * (best.accuracy.mean - other.accuracy.mean)
        text = f"vs {other.name} ({other.accuracy.mean:.1%}): {gap:+.1f} points, "
        comparisons.append(text + _verdict(_paired_p(best.per_problem, other.per_problem)))
    if comparisons:
        several_seeds = any(len(r.accuracy.n) > 1 for r in measured)
        lines.append(
            f"{best.name}'s lead: {'; '.join(comparisons)}"
            + (" (paired on each method's first seed)" if several_seeds else "")
            + (f"; {len(comparisons)} tests, not corrected for multiple comparisons" if len(comparisons) > 1 else "")
            + "."
        )
    if missing:
        lines.append(f"Task accuracy not measured for {_names(missing)}.")
    return lines


def _second_significance(rows: list[MethodRow], second: str) -> list[str]:
    """Which methods' change in second-task accuracy the problems support (McNemar against the starting model)."""
    tested = [r for r in rows if r.second_p_vs_base is not None]
    if not tested:
        return []
    significant = [f"{r.name} ({p_text(r.second_p_vs_base)})" for r in tested if r.second_p_vs_base < SIGNIFICANCE]
    not_significant = [f"{r.name} ({p_text(r.second_p_vs_base)})" for r in tested if r.second_p_vs_base >= SIGNIFICANCE]
    text = f"The change in {second} accuracy vs the starting model is "
    text += f"significant for {_names(significant)}" if significant else "significant for no method"
    text += f"; not significant for {_names(not_significant)}" if not_significant else ""
    return [text + " (exact McNemar on the same problems, first seed)."]


def conclusions(rows: list[MethodRow]) -> list[str]:
    """What the numbers say, one sentence each: the best task accuracy and whether its lead over each other method
    is significant, which trained method retains best on each retention measure, which uses least memory."""
    lines = [
        f"{row.name} is left out of the accuracy and retention comparisons: evaluated differently from the reference "
        f"({'; '.join(row.differences)})."
        for row in rows
        if row.differences
    ]
    comparable = [r for r in rows if not r.differences]
    lines += _accuracy_conclusions(comparable)
    # the starting model is the zero of every retention measure; memory is measured in training, not evaluation
    retaining = [r for r in comparable if not r.is_base]
    trained = [r for r in rows if not r.is_base]
    second = next((r.setting.get("second task") for r in rows if r.setting.get("second task")), "second task")
    lines += [
        _ranking(
            f"Keeps the {second} accuracy best (change vs the starting model; higher kept more)",
            retaining, lambda r: r.second_change and r.second_change.mean, False, lambda v: f"{v:+.1f} points",
        ),
        *_second_significance(retaining, second),
        _ranking(
            "Keeps general-text perplexity best (change vs the starting model; lower kept more)",
            retaining, lambda r: r.perplexity_change and r.perplexity_change.mean, True, lambda v: f"{v:+.1%}",
        ),
        _ranking(
            "Moves least from the starting model (mean per-token KL on general text)",
            retaining, lambda r: r.kl_to_base and r.kl_to_base.mean, True, lambda v: f"{v:.4f}",
        ),
        _ranking(
            "Least activation memory (peak bytes saved for backward)",
            trained, lambda r: r.activation_mib and r.activation_mib.mean, True, lambda v: f"{v:.1f} MiB",
        ),
        _ranking(
            "Least process memory (peak device memory, or peak RSS on CPU)",
            trained, lambda r: r.memory_mib and r.memory_mib.mean, True, lambda v: f"{v:.0f} MiB",
        ),
    ]  # fmt: skip
    return lines


# --- the plots


def _errors(accuracy: Accuracy, scale: float = 100.0) -> list[list[float]]:
    """Matplotlib's asymmetric error bars of an accuracy: its Wilson interval around the mean."""
    low, high = accuracy.interval
    return [[max(0.0, (accuracy.mean - low) * scale)], [max(0.0, (high - accuracy.mean) * scale)]]


NAMED_POINTS = 6  # up to this many methods a scatter names each point; more would overlap: the legend names them


def _method_legend(fig, names: list[str], colours: dict[str, str]) -> None:
    """One legend for the whole figure, outside the plots on the right: a method's colour is the same in every
    panel, and a legend inside would hide lines once a study has more than a few methods."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[name], marker="o", label=name) for name in names]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")


def _scatter(ax, points: list[tuple[MethodRow, float, list[list[float]] | None]], colours: dict[str, str]) -> None:
    for row, x, xerr in points:
        y = 100 * row.accuracy.mean
        ax.errorbar(x, y, xerr=xerr, yerr=_errors(row.accuracy), fmt="o", capsize=3, color=colours[row.name])
        if len(points) <= NAMED_POINTS:
            ax.annotate(row.name, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.axvline(0, color="grey", linewidth=0.8)


def _layer_mean(group: Group, key: str) -> list[float] | None:
    """A per-layer list averaged over the seeds that have it (all of one length: the same model)."""
    lists = [run.evaluation[key] for _, run in group if run.evaluation.get(key)]
    if not lists or len({len(values) for values in lists}) > 1:
        return None
    return [sum(values) / len(values) for values in zip(*lists, strict=True)]


def _retention_plot(plt, rows: list[MethodRow], study: dict, colours: dict[str, str]):
    scored = [r for r in rows if r.accuracy is not None and not r.differences]
    second = [(r, r.second_change.mean, _errors(r.second_accuracy)) for r in scored if r.second_change is not None]
    kl = [(r, r.kl_to_base.mean, None) for r in scored if r.kl_to_base is not None]
    panels = [
        (points, xlabel, title, caption)
        for points, xlabel, title, caption in (
            (second, f"{study.get('second_task', 'second task')} accuracy change vs start (points)",
             "Task accuracy vs second-task retention", "the second task's accuracy change vs the starting model"),
            (kl, "KL to the starting model (mean per token, general text)", "Task accuracy vs drift",
             "the KL to the starting model"),
        )
        if points
    ]  # fmt: skip
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False, layout="constrained")
    for ax, (points, xlabel, title, _) in zip(axes[0], panels, strict=True):
        _scatter(ax, points, colours)
        ax.set(xlabel=xlabel, ylabel="task accuracy (%)", title=title)
    if max(len(points) for points, *_ in panels) > NAMED_POINTS:
        _method_legend(fig, [r.name for r in scored], colours)
    left_out = [r.name for r in rows if r.differences]
    caption = (
        f"Task accuracy against {' and against '.join(c for *_, c in panels)}, one point per method; error bars: 95% "
        "Wilson intervals." + (f" Left out, evaluated differently: {', '.join(left_out)}." if left_out else "")
    )
    return fig, caption


def _layer_plot(plt, rows: list[MethodRow], groups: dict[str, Group], colours: dict[str, str]):
    from matplotlib.ticker import MaxNLocator

    layered = [
        (row.name, _layer_mean(groups[row.name], "layer_cka"), _layer_mean(groups[row.name], "layer_weight_change"))
        for row in rows
        if not row.is_base  # the starting model against itself: CKA 1, no change
    ]
    if not any(cka or change for _, cka, change in layered):
        return None
    fig, (cka_ax, change_ax) = plt.subplots(1, 2, figsize=(12.8, 4.2), layout="constrained")
    for name, cka, change in layered:
        for ax, values in ((cka_ax, cka), (change_ax, change)):
            if values:
                ax.plot(range(len(values)), values, marker=".", color=colours[name], label=name)
    cka_ax.set(
        xlabel="decoder layer", ylabel="linear CKA with the starting model", title="Hidden states (1: unchanged)"
    )
    change_ax.set(xlabel="decoder layer", ylabel="relative weight change", title="Weights (‖ΔW‖ / ‖W‖)")
    for ax in (cka_ax, change_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _method_legend(fig, [name for name, cka, change in layered if cka or change], colours)
    return fig, "Where each method changed the model, decoder layer by layer (mean over seeds)."


BLOCK_STYLES = ("-", "--", ":", "-.")


def _loss_plot(plt, groups: dict[str, Group], colours: dict[str, str]):
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    trained = [(name, entry, run) for name, group in groups.items() for entry, run in group if run.series("task_loss")]
    if not trained:
        return None
    local = [(name, entry, run) for name, entry, run in trained if any(v for _, v in run.series("aux_loss"))]
    panels = 1 + bool(local)
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.2), squeeze=False, layout="constrained")
    ax = axes[0][0]
    for name, _, run in trained:  # seeds in their method's colour
        curve(ax, run.series("task_loss"), marker=".", color=colours[name])
    ax.set(xlabel="step", ylabel="task loss", title="Task loss")
    if local:
        ax = axes[0][1]
        for name, _, run in local:
            points = run.series("aux_loss")
            for block in range(max(len(v) for _, v in points)):
                # a block's value may be null in a row; the log axis also needs it positive
                kept = [(s, v[block]) for s, v in points if len(v) > block and v[block] and v[block] > 0]
                if kept:
                    curve(ax, kept, marker=".", color=colours[name], linestyle=BLOCK_STYLES[block % len(BLOCK_STYLES)])
        ax.set(xlabel="step", ylabel="local reconstruction loss", title="Local loss per LoPT block", yscale="log")
        blocks = max(len(v) for _, _, run in local for _, v in run.series("aux_loss"))
        ax.legend(  # the line style tells the block; the figure's legend, the method
            handles=[
                Line2D([], [], color="grey", linestyle=BLOCK_STYLES[b % len(BLOCK_STYLES)], label=f"block {b + 1}")
                for b in range(blocks)
            ],
            fontsize="small",
        )
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _method_legend(fig, list(dict.fromkeys(name for name, _, _ in trained)), colours)
    counts = ", ".join(f"{run.name} {len(run.series('task_loss'))}" for _, _, run in trained)
    caption = f"Every logged step of each run's task loss (logged points: {counts})" + (
        "; each LoPT block's local loss, log scale." if local else "."
    )
    return fig, caption


def make_plots(rows: list[MethodRow], groups: dict[str, Group], study: dict, out: Path) -> list[tuple[str, str]]:
    """Write the PNG plots; returns (file name, caption) of those that had data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    # a method has one colour in every plot; past ten methods, twenty colours (tab20) before any repeats
    palette = matplotlib.colormaps["tab10" if len(rows) <= 10 else "tab20"]
    colours = {row.name: palette(i % palette.N) for i, row in enumerate(rows)}
    plots = []
    for name, made in (
        ("accuracy_retention.png", _retention_plot(plt, rows, study, colours)),
        ("layers.png", _layer_plot(plt, rows, groups, colours)),
        ("training_loss.png", _loss_plot(plt, groups, colours)),
    ):
        if made is not None:
            fig, caption = made  # laid out by matplotlib's constrained layout, the legend outside the plots
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            plots.append((name, caption))
    return plots


# --- the files


def _describe(study: dict, reference: MethodRow | None) -> str:
    """One paragraph: how the numbers were measured (the reference's evaluation setting) and aggregated."""
    setting = reference.setting if reference else {}
    parts = [f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {STUDY_FILE}."]
    if setting.get("problems") is not None:
        limit = f", at most {setting['max new tokens']} new tokens" if setting.get("max new tokens") else ""
        parts.append(
            f"Task accuracy: greedy answers to {setting['problems']} held-out {setting.get('task')} problems{limit}, "
            "final-answer exact match, with its 95% Wilson interval and n."
        )
    if setting.get("second task") is not None:
        parts.append(
            f"Second task: {setting.get('second-task problems')} {setting['second task']} problems no run trained on; "
            "its change vs the starting model is in accuracy points."
        )
    if setting.get("retention tokens") is not None:
        parts.append(
            f"Perplexity change and KL (mean per-token KL divergence of the starting model's next-token distribution "
            f"from the trained model's) on {setting['retention tokens']} tokens of general text "
            f"({setting.get('retention text') or 'source not recorded'})."
        )
    if reference is not None:
        parts.append(
            f"Δ vs {reference.name}: accuracy difference in points with the exact McNemar p, paired problem by "
            "problem on each method's first seed."
        )
    parts.append("With several seeds: mean ± std over seeds, and the Wilson interval of the accuracy pooled over them.")
    return " ".join(parts)


def _setup(study: dict, groups: dict[str, Group]) -> list[str]:
    lines = []
    settings = study.get("settings") or {}
    if settings:
        lines += ["Settings: " + md_text(", ".join(f"{key} {value}" for key, value in settings.items())) + ".", ""]
    for name, group in groups.items():
        entry, run = group[0]
        rates = sorted({e.get("learning_rate", r.args.get("learning_rate")) for e, r in group} - {None})
        text = f"**{md_text(name)}** ({md_text(entry.get('method', '?'))})"
        text += f": folders {md_text(', '.join(e['dir'] for e, _ in group))}"
        text += f"; learning rate {', '.join(f'{r:g}' for r in rates)}" if rates else ""
        text += f"; {md_text(entry['notes'])}" if entry.get("notes") else ""
        lines.append(f"- {text}")
    return lines


def _sweep(study: dict, rows: list[MethodRow]) -> list[str]:
    """`lopt demo --sweep`'s section: each LoPT knob changed alone, against the paper's setting at the same k (paired
    McNemar on the first seed), then the best setting at each k."""
    entries = {entry["name"]: entry["sweep"] for entry in study["runs"] if entry.get("sweep")}
    by_name = {row.name: row for row in rows}
    second = study.get("second_task") or "second task"
    header = ["k", "knob", "method", "task accuracy", "Δ vs paper's setting (McNemar)",
              f"{second} Δ vs base (McNemar)",
              "perplexity change", "KL to start"]  # fmt: skip
    cells, best_lines = [], []
    for blocks in sorted({entry["k"] for entry in entries.values()}):
        swept = [(name, entry) for name, entry in entries.items() if entry["k"] == blocks and name in by_name]
        paper = by_name.get(next((entry["paper"] for _, entry in swept), ""))
        for name, entry in swept:
            row = by_name[name]
            delta = "-"
            if row is not paper and paper is not None and row.accuracy and paper.accuracy:
                delta = _accuracy_delta(row, paper, _paired_p(row.per_problem, paper.per_problem))
            cells.append([
                str(blocks), entry["knob"], name, accuracy_text(row.accuracy), delta, _second_change_cell(row),
                _with_spread(row.perplexity_change, "+.1f", 100, "%"), _with_spread(row.kl_to_base, ".4f"),
            ])  # fmt: skip
        scored = [by_name[name] for name, _ in swept if by_name[name].accuracy]
        if scored and paper is not None and paper.accuracy:
            best = max(scored, key=lambda r: r.accuracy.mean)
            if best is paper or best.accuracy.mean == paper.accuracy.mean:
                best_lines.append(
                    f"k={blocks}: no knob beats the paper's setting ({paper.name}, {paper.accuracy.mean:.1%})."
                )
            else:
                verdict = _verdict(_paired_p(best.per_problem, paper.per_problem))
                best_lines.append(
                    f"k={blocks}: best task accuracy {best.name} ({entries[best.name]['knob']}) with "
                    f"{best.accuracy.mean:.1%}, {100 * (best.accuracy.mean - paper.accuracy.mean):+.1f} points over "
                    f"the paper's setting ({paper.accuracy.mean:.1%}): {verdict}."
                )
    return [*md_table(header, cells), "", *(f"- {md_text(line)}" for line in best_lines)]


def study_markdown(study: dict, groups: dict[str, Group], rows: list[MethodRow], plots: list[tuple[str, str]]) -> str:
    reference = next((r for r in rows if r.is_reference), None)
    title = study.get("title") or "lopt study"
    # The table is the third block (after the title and one paragraph): `lopt demo` prints it from there.
    lines = [f"# {md_text(title)}", "", md_text(_describe(study, reference)), "", *markdown_table(study, rows)]
    for note in _flag_notes(rows):
        lines += ["", md_text(note)]
    lines += ["", "## Conclusions", "", *(f"- {md_text(line)}" for line in conclusions(rows))]
    if plots:
        lines += ["", "## Plots"]
        for name, caption in plots:
            lines += ["", f"![{md_text(caption)}]({name})", "", f"*{md_text(caption)}*"]
    lines += ["", "## Setup", "", *_setup(study, groups)]
    if any(entry.get("sweep") for entry in study["runs"]):
        lines += ["", "## LoPT's knobs (--sweep)", "", *_sweep(study, rows)]
    return "\n".join(lines) + "\n"


def write_study_report(out: Path) -> list[MethodRow]:
    """Read OUT/study.json and the runs' folders; write OUT/report.md, OUT/report.html and the plots. Returns the
    table's rows."""
    out = Path(out)
    study, groups = load_study(out)
    rows = method_rows(study, groups)
    plots = make_plots(rows, groups, study, out)
    text = study_markdown(study, groups, rows, plots)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(markdown_to_html(study.get("title") or "lopt study", text))
    return rows
