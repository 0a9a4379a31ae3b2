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
from datetime import datetime, timezone
from pathlib import Path

from lopt.study.plots import make_plots
from lopt.study.results import (
    SIGNIFICANCE,
    STUDY_FILE,
    Accuracy,
    Group,
    Measure,
    MethodRow,
    load_study,
    method_rows,
    paired_p,
)
from lopt.tools.reporting import markdown_to_html, md_table, md_text

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
        comparisons.append(text + _verdict(paired_p(best.per_problem, other.per_problem)))
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
                delta = _accuracy_delta(row, paper, paired_p(row.per_problem, paper.per_problem))
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
                verdict = _verdict(paired_p(best.per_problem, paper.per_problem))
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
