"""What `lopt report` (tools/report.py) and the study's report (lopt.study.report) both write: Markdown tables and
text that cannot break them, report.html from report.md, numbers and MiB, accuracy cells with their interval, the
evaluation setting a row was measured on and how two settings differ, and learning curves.
"""

from __future__ import annotations

import html
import re

from lopt.evaluation.statistics import wilson_interval

MiB = 2**20
# Runs with fewer logged steps are drawn as points: a line through two points is not a learning curve.
MIN_CURVE_POINTS = 3


def number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mib(value: float | None) -> float | None:
    return None if value is None else value / MiB


def accuracy_cell(correct: int, n: int) -> str:
    """An accuracy with its 95% Wilson interval and sample size, e.g. "62.5% [55.6, 68.9] n=200"."""
    low, high = wilson_interval(correct, n)
    return f"{correct / n if n else 0:.1%} [{100 * low:.1f}, {100 * high:.1f}] n={n}"


def evaluation_setting(e: dict) -> dict[str, object]:
    """What an eval.json's numbers were measured on; rows compare only where these agree (None: not recorded)."""
    setting: dict[str, object] = {
        # a reward model is scored on preference pairs (`lopt eval --reward_model`), not on a task
        "task": e.get("task") or (f"pairs of {e['pairs']}" if "pairs" in e else None),
        "problems": e.get("n"),
        "max new tokens": e.get("max_new_tokens"),
        "retention text": e.get("retention_source"),
        "retention tokens": e.get("retention_tokens"),
    }
    second = e.get("second_task")
    if second:
        setting.update({"second task": second.get("task"), "second-task problems": second.get("n")})
    return setting


def setting_differences(setting: dict[str, object], reference: dict[str, object]) -> list[str]:
    """How `setting` differs from `reference`, one "name value (reference value)" each; empty when they agree."""
    names = list(reference) + [name for name in setting if name not in reference]
    return [
        f"{name} {_recorded(setting.get(name))} (reference {_recorded(reference.get(name))})"
        for name in names
        if setting.get(name) != reference.get(name)
    ]


def _recorded(value) -> str:
    return "not recorded" if value is None else str(value)


def describe_setting(setting: dict[str, object]) -> str:
    """A table cell saying what a row was evaluated on, e.g. "200 aiw, ≤256 new tokens; ppl 4096 tokens"."""
    parts = []
    if setting.get("problems") is not None:
        task = f"{setting['problems']} {_recorded(setting.get('task'))}"
        if setting.get("max new tokens") is not None:
            task += f", ≤{setting['max new tokens']} new tokens"
        parts.append(task)
    if setting.get("second task") is not None:
        parts.append(f"{_recorded(setting.get('second-task problems'))} {setting['second task']}")
    if setting.get("retention tokens") is not None:
        parts.append(f"ppl {setting['retention tokens']} tokens")
    return "; ".join(parts) or "-"


def md_text(text: str) -> str:
    """Text made safe for a Markdown table cell or paragraph: a | would end the cell, a newline the row, and a <
    before a letter would start raw HTML in report.html."""
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def md_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """A Markdown table whose cells cannot break it."""
    lines = ["| " + " | ".join(map(md_text, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(md_text, row)) + " |" for row in rows]


def markdown_to_html(title: str, text: str) -> str:
    """report.html from report.md's text: the same content, tables as <table>, `code` as <code>, images as <img>."""
    import markdown

    body = markdown.markdown(text, extensions=["tables"], output_format="html")
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        "<style>body{font-family:sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}code{background:#f4f4f4;padding:0 3px}</style></head><body>\n"
        f"{body}\n</body></html>\n"
    )


def curve(ax, points: list[tuple[int, float]], **style):
    """Every logged point; runs with too few of them as markers only, so that no line suggests a trend."""
    steps, values = zip(*points, strict=True)
    linestyle = style.pop("linestyle", "-")
    linestyle = linestyle if len(points) >= MIN_CURVE_POINTS else "none"
    return ax.plot(steps, values, marker=style.pop("marker", "o"), linestyle=linestyle, **style)[0]
