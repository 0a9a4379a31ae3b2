"""A study's results as data: study.json and each method's runs, one row per method with its seeds aggregated, each
row's evaluation setting checked against the reference's and its paired tests against the reference and the starting
model. The study's report (report.py) and plots (plots.py) read these rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lopt.errors import LoptError
from lopt.evaluation.statistics import mcnemar_exact, mean_std, wilson_interval
from lopt.runs import Run, load_run, read_json
from lopt.tools.reporting import MiB, evaluation_setting, setting_differences

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


def paired_p(a: list[bool] | None, b: list[bool] | None) -> float | None:
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
                row.p_vs_reference = paired_p(row.per_problem, reference.per_problem)
        if base is not None and base.second_accuracy is not None and row.second_accuracy is not None:
            row.second_change = Measure(
                [100 * (v - base.second_accuracy.mean) for v in row.second_accuracy.measure.values]
            )
            if not row.is_base:
                row.second_p_vs_base = paired_p(row.second_per_problem, base.second_per_problem)
    return rows
