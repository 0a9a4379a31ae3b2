"""The dashboard's panels: functions of a DashboardState to rich renderables, and the screens made of them.

Every panel reads only the state, so the live dashboard and `lopt watch` draw the same thing, and tests
render them on a recording console. `DashboardView` is one run's screen; `ComparisonView` puts several
runs side by side (task loss curves on one shared scale, memory columns, relative to E2E where an E2E
run is among them); `summary` is what stays on the terminal after a live run.
"""

from __future__ import annotations

import math
import time

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.layout import Layout
from rich.measure import Measurement
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from lopt.dashboard.state import RL_SERIES, DashboardState, Series
from lopt.recipes.registry import recipe_record

LEVELS = " ▁▂▃▄▅▆▇█"  # eighths of a character cell, from empty to full
COMPLETIONS_SHOWN = 4
EVENT_STYLES = {"ERROR": "bold red", "CRITICAL": "bold red", "WARNING": "yellow", "checkpoint": "green", "run": "cyan"}
STUDY_MARKS = {"done": "[green]✓[/]", "training": "[bold yellow]●[/]", "pending": "[dim]○[/]"}


# Numbers as a person reads them.


def format_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while abs(count) >= 1024 and len(units) > 1:
        count, units = count / 1024, units[1:]
    return f"{count:.0f} B" if units[0] == "B" else f"{count:.1f} {units[0]}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_value(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def loss_change(series: Series) -> str:
    """'2.3456 → 1.2345': the first and the last value drawn."""
    first = series.points[0][1] if series.points else None
    return f"{format_value(first)} → {format_value(series.last())}"


def layer_ranges(blocks: list[range]) -> str:
    """'layers 0-14 | 15-29': each block's decoder layers."""
    return "layers " + " | ".join(f"{block.start}-{block.stop - 1}" for block in blocks)


# Sparklines and curves.


def bars(values: list[float | None], height: int = 1, low: float | None = None, high: float | None = None):
    """Rows of block characters, one column per value (None: an empty column), scaled from `low` to
    `high` (default: the values' own range); the lowest value still shows a sliver, a flat series sits
    at half height."""
    drawn = [v for v in values if v is not None]
    if not drawn:
        return [" " * len(values)] * height
    low = min(drawn) if low is None else low
    high = max(drawn) if high is None else high
    span = high - low

    def eighths(value: float | None) -> int:
        if value is None:
            return 0
        return 1 + round((value - low) / span * (height * 8 - 1)) if span > 0 else height * 4

    levels = [eighths(v) for v in values]
    return ["".join(LEVELS[min(max(e - row * 8, 0), 8)] for e in levels) for row in range(height - 1, -1, -1)]


def by_index(values: list[float], width: int) -> list[float]:
    """At most `width` values: the means of equal runs of them when there are more (a sparkline)."""
    if len(values) <= width:
        return values
    edges = [round(i * len(values) / width) for i in range(width + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False)]


def by_step(points: list[tuple[int, float]], width: int, first: int, last: int) -> list[float | None]:
    """`width` columns over steps `first`..`last`: each the mean of the points in its steps, an empty
    column repeating the one before it up to the series' last point, and None after it (not trained yet)."""
    span = max(last - first, 1)
    sums, counts = [0.0] * width, [0] * width
    for step, value in points:
        column = min(max(round((step - first) / span * (width - 1)), 0), width - 1)
        sums[column] += value
        counts[column] += 1
    end = max((i for i in range(width) if counts[i]), default=-1)
    columns: list[float | None] = []
    for i in range(width):
        if counts[i]:
            columns.append(sums[i] / counts[i])
        else:
            columns.append(columns[-1] if columns and i < end else None)
    return columns


class Sparkline:
    """The latest values as one line of block characters, as wide as the space it is given."""

    def __init__(self, values: list[float], style: str = "green"):
        self.values, self.style = values, style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(bars(by_index(self.values, options.max_width))[0], style=self.style, no_wrap=True)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(4, options.max_width)


class Curve:
    """A series drawn by step over `steps` (first, last), as tall as the height it is given (else
    `natural_height`), from `low` to `high`; with `axes`, its range on the left and the steps below."""

    def __init__(self, series: Series, steps: tuple[int, int], low=None, high=None, axes=True, natural_height=8):
        self.series, self.steps, self.low, self.high = series, steps, low, high
        self.axes, self.natural_height = axes, natural_height

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.series.points:
            yield Text("no logged steps yet", style="dim")
            return
        axis_lines = 1 if self.axes else 0  # the steps line below the curve
        height = max((options.height or self.natural_height) - axis_lines, 1)
        values = self.series.values()
        low = min(values) if self.low is None else self.low
        high = max(values) if self.high is None else self.high
        labels = [format_value(high), format_value(low)] if self.axes else ["", ""]
        pad = max(len(label) for label in labels) + axis_lines
        width = max(options.max_width - pad, 1)
        rows = bars(by_step(self.series.points, width, *self.steps), height, low, high)
        for i, row in enumerate(rows):
            label = labels[0] if i == 0 else labels[1] if i == len(rows) - 1 else ""
            yield Text(f"{label:>{pad - axis_lines}}" + " " * axis_lines, style="dim") + Text(row, style="green")
        if self.axes:
            first, last = f"step {self.steps[0]}", f"step {self.steps[1]}"
            yield Text(" " * pad + first + last.rjust(width - len(first)), style="dim", no_wrap=True)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(8, options.max_width)


def step_range(states: list[DashboardState]) -> tuple[int, int]:
    """The steps a curve spans: from the first point drawn to the end of the longest run (its total
    steps when known), so a curve also shows how far its run has come."""
    firsts = [s.task_loss.points[0][0] for s in states if s.task_loss.points]
    lasts = [max(s.step, s.total_steps()[0] or 0) for s in states]
    first = min(firsts, default=0)
    return first, max(max(lasts, default=0), first + 1)


class Tail:
    """The last lines that fit the height it is given (the latest `natural` when none is given); each
    line must not wrap, so that one line takes one row."""

    def __init__(self, lines: list[Text], natural: int = 8):
        self.lines, self.natural = lines, natural

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        fit = options.height if options.height is not None else self.natural
        yield from self.lines[-fit:] if fit > 0 else []


def _grid(*ratios: int | None) -> Table:
    grid = Table.grid(expand=True, padding=(0, 1))
    for ratio in ratios:
        # the stretching column (sparklines, bars) keeps some room when the labels are long
        grid.add_column(ratio=ratio, no_wrap=True, overflow="ellipsis", min_width=10 if ratio else None)
    return grid


def _panel(body: RenderableType, title: str) -> Panel:
    return Panel(body, title=f"[bold]{title}[/]", title_align="left", border_style="blue")


# The panels.


def method_label(state: DashboardState) -> str:
    run = state.run
    if run is None:
        return "no run files yet"
    if run.method == "e2e":
        return "E2E (end-to-end, one block)"
    early = " · early blocks frozen" if (state.args or {}).get("early_blocks") == "frozen" else ""
    return f"LoPT · k={state.num_blocks} · {run.backward} backward{early}"


def run_panel(state: DashboardState) -> Panel:
    grid = _grid(None, 1)
    run, args = state.run, state.args or {}
    if args.get("model_name_or_path"):
        grid.add_row("model", args["model_name_or_path"])
    grid.add_row("method", method_label(state))
    if run is not None:
        if run.blocks:
            grid.add_row("blocks", layer_ranges(run.blocks))
        elif run.method == "lopt":
            grid.add_row("blocks", "[dim]layer ranges once the model's config.json is in the run folder[/]")
        grid.add_row("data", _data_line(args, run.details))
        if run.world_size > 0:  # 0: not recorded in the run's files (lopt watch)
            grid.add_row("processes", f"{run.world_size} · {run.backend}")
        grid.add_row("output", str(run.output_dir))
    return _panel(grid, f"run · {state.run.recipe}" if run is not None else "run")


def _data_line(args: dict, details: dict) -> str:
    source = args.get("train_file") or args.get("dataset_name") or args.get("task") or args.get("dataset_preset")
    counts = [
        f"{value:,} {name.replace('_', ' ')}" if isinstance(value, int) else f"{name.replace('_', ' ')} {value}"
        for name, value in details.items()
    ]
    parts = ([str(source)] if source else []) + counts
    return " · ".join(parts) or "-"


def progress_panel(state: DashboardState) -> Panel:
    grid = _grid(None, 1)
    total, estimated = state.total_steps()
    if total:
        bar = ProgressBar(total=total, completed=min(state.step, total), width=None)
        counted = f"{state.step} / {'~' * estimated}{total}"
        grid.add_row("step", Group(Text(counted + ("  finished" if state.finished else "")), bar))
    else:
        grid.add_row("step", f"{state.step}" + ("  finished" if state.finished else ""))
    if state.metrics is not None and state.metrics.epoch is not None:
        grid.add_row("epoch", f"{state.metrics.epoch:.2f}")
    grid.add_row("elapsed", f"{format_duration(state.elapsed_s)}   ETA {format_duration(state.eta_s())}")
    per_step = state.seconds_per_step()
    speed = [f"{per_step:.2f} s/step"] if per_step else []
    if state.metrics is not None:
        speed.append(f"{state.metrics.tokens_per_s:,.0f} tokens/s")
    if speed:
        grid.add_row("speed", " · ".join(speed))
    if state.study:
        grid.add_row("study", "  ".join(f"{STUDY_MARKS.get(r.status, '?')} {r.name}" for r in state.study))
    return _panel(grid, "progress")


def _series_row(grid: Table, label: str, series: Series, digits: int = 4) -> None:
    grid.add_row(label, format_value(series.last(), digits), Sparkline(series.values()))


def training_panel(state: DashboardState) -> Panel:
    grid = _grid(None, None, 1)
    k = state.num_blocks
    _series_row(grid, "task loss" if k == 1 else f"task loss · block {k}", state.task_loss)
    for i, series in enumerate(state.aux_losses):
        _series_row(grid, f"recon loss · block {i + 1}", series)
    if state.eval_task_loss.values():
        _series_row(grid, "eval task loss", state.eval_task_loss)
    metrics = state.metrics
    if metrics is not None:
        grid.add_row("lr", f"{metrics.lr:.2e}", f"lr_k1 {metrics.lr_k1:.2e}" if k > 1 else "")
        grid.add_row("grad norm", format_value(metrics.grad_norm, 3), "")
        grid.add_row("activations", format_bytes(metrics.activation_peak_bytes), "[dim]peak saved for backward[/]")
    if state.e2e_activation_bytes and metrics is not None and state.run is not None and state.run.method != "e2e":
        share = metrics.activation_peak_bytes / state.e2e_activation_bytes
        grid.add_row("E2E would need", format_bytes(state.e2e_activation_bytes), f"[dim]this run: {share:.0%} of it[/]")
    return _panel(grid, "training")


def rl_panel(state: DashboardState) -> Panel | None:
    """The rewards of a recipe trained on sampled completions (GRPO, RLOO: the rewards and the completions) or on
    preference data (DPO's implicit reward, a reward model's score: accuracy and margin), as its registry record says
    what it trains on; None for SFT."""
    recipe = recipe_record(state.recipe)
    data = recipe.data if recipe else None
    if data == "prompts":
        return _panel(_grpo_body(state), f"rewards · {state.recipe}")
    if data == "pairs":
        return _panel(_dpo_body(state), f"rewards · {state.recipe}")
    return None


def _grpo_body(state: DashboardState) -> RenderableType:
    grid = _grid(None, None, 1)
    columns = state.metrics.recipe if state.metrics is not None else {}
    grid.add_row("reward mean", format_value(columns.get("reward"), 3), Sparkline(_values(state, "reward")))
    grid.add_row("reward std", format_value(columns.get("reward_std"), 3), "")
    latest = state.newest_step_completions()
    for name in latest[0].rewards if latest else []:
        scores = [c.rewards[name] for c in latest if c.rewards.get(name) is not None]
        mean = sum(scores) / len(scores) if scores else None
        grid.add_row(
            f"  {name}", format_value(mean, 3), f"[dim]mean over step {latest[0].step}'s {len(latest)} completions[/]"
        )
    length = columns.get("completion_length")
    grid.add_row("completion length", "-" if length is None else f"{length:.0f}", "[dim]tokens, mean[/]")
    samples = list(state.completions)[-COMPLETIONS_SHOWN:]
    lines = [Text("latest completions", style="bold")] if samples else [Text("no completions yet", style="dim")]
    for sample in samples:
        line = Text(f"{format_value(sample.reward, 2):>5}  ", style="bold")
        line.append(_one_line(sample.completion))
        line.append(f"   ← {_one_line(sample.prompt)}", style="dim")  # the prompt, after what was sampled for it
        line.no_wrap, line.overflow = True, "ellipsis"
        lines.append(line)
    return Group(grid, *lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())  # newlines and runs of spaces as one space


def _values(state: DashboardState, column: str) -> list[float]:
    series = state.recipe_series.get(column)
    return series.values() if series is not None else []


def _dpo_body(state: DashboardState) -> RenderableType:
    grid = _grid(None, None, 1)
    columns = state.metrics.recipe if state.metrics is not None else {}
    accuracy = columns.get("reward_accuracy")
    grid.add_row(
        "reward accuracy", "-" if accuracy is None else f"{accuracy:.0%}", Sparkline(_values(state, "reward_accuracy"))
    )
    grid.add_row(
        "reward margin", format_value(columns.get("reward_margin"), 3), Sparkline(_values(state, "reward_margin"))
    )
    if "reward_mean" in columns:  # a reward model's mean score
        grid.add_row("mean score", format_value(columns.get("reward_mean"), 3), "[dim]over chosen and rejected[/]")
        return grid
    chosen, rejected = format_value(columns.get("reward_chosen"), 3), format_value(columns.get("reward_rejected"), 3)
    grid.add_row("chosen / rejected", f"{chosen} / {rejected}", "[dim]mean implicit rewards[/]")
    return grid


def hardware_panel(state: DashboardState) -> Panel:
    grid = _grid(None, None, 1)
    sample = state.hardware
    if sample is not None and sample.rss_bytes is not None:
        cpu = "-" if sample.cpu_percent is None else f"{sample.cpu_percent:.0f}%"
        grid.add_row(
            "process", f"CPU {cpu}", f"RSS {format_bytes(sample.rss_bytes)} (peak {format_bytes(state.peak_rss_bytes)})"
        )
    for gpu in sample.gpus if sample is not None else []:
        used = f"{format_bytes(gpu.used_bytes)} / {format_bytes(gpu.total_bytes)}"
        utilization = "" if gpu.utilization_percent is None else f"  util {gpu.utilization_percent}%"
        bar = ProgressBar(total=gpu.total_bytes, completed=gpu.used_bytes, width=12)
        grid.add_row(f"GPU {gpu.index}", Group(Text(f"{gpu.name}: {used}{utilization}"), bar), "")
    if sample is not None and sample.gpu_note:
        grid.add_row("GPU", Text(sample.gpu_note, style="dim"), "")
    if state.peak_mem_bytes:
        grid.add_row("run peak", format_bytes(state.peak_mem_bytes), "[dim]logged (CUDA max allocated / peak RSS)[/]")
    if not grid.rows:
        grid.add_row("", Text("not sampled yet", style="dim"), "")
    return _panel(grid, "hardware")


def event_lines(state: DashboardState) -> list[Text]:
    lines = []
    for event in state.events:
        line = Text(time.strftime("%H:%M:%S ", time.localtime(event.when)), style="dim")
        if event.kind not in ("stdout", "stderr"):
            line.append(f"{event.kind} ", style=EVENT_STYLES.get(event.kind, "bold"))
        line.append(event.text, style=EVENT_STYLES.get(event.kind, ""))
        line.no_wrap, line.overflow = True, "ellipsis"  # one line per event, however long its text
        lines.append(line)
    return lines


def events_panel(state: DashboardState) -> Panel:
    lines = event_lines(state) or [Text("no warnings, checkpoints or messages yet", style="dim")]
    dropped = f" · {state.dropped_updates} updates dropped (queue full)" if state.dropped_updates else ""
    return _panel(Tail(lines), f"events{dropped}")


# Screens.


def header(state: DashboardState) -> Text:
    text = Text(f" lopt {state.run.recipe} " if state.run is not None else " lopt ", style="bold reverse")
    text.append(f"  {method_label(state)}")
    if state.run is not None:
        text.append(f"  {state.run.output_dir}", style="dim")
    if state.finished:
        text.append("  finished", style="bold green")
    elif state.last_row_time is not None:
        ago = time.time() - state.last_row_time
        text.append(f"  last metrics row {format_duration(ago)} ago", style="dim")
    text.no_wrap, text.overflow = True, "ellipsis"  # one line: the rows below are measured without it
    return text


def curve_panels(state: DashboardState) -> list[Panel]:
    """The task loss by step, and next to it the reward (GRPO) or the reward accuracy (DPO) by step."""
    steps = step_range([state])
    panels = [_panel(Curve(state.task_loss, steps), "task loss by step")]
    for column in ("reward", "reward_accuracy"):
        if column in state.recipe_series:
            panels.append(_panel(Curve(state.recipe_series[column], steps), f"{column.replace('_', ' ')} by step"))
    return panels


class DashboardView:
    """One run's screen, row by row: run | progress, training | rewards or hardware, the curves,
    hardware | events (SFT: events).

    Each row is as tall as its taller panel; given a height (a full screen), the curves take what is
    left, so a taller terminal draws them taller."""

    CURVES_ROW = 2  # the row that takes the height the others leave (rows() puts the curves third)

    def __init__(self, state: DashboardState):
        self.state = state

    def rows(self) -> list[list[Panel]]:
        state = self.state
        rewards = rl_panel(state)
        if rewards is None:
            return [
                [run_panel(state), progress_panel(state)],
                [training_panel(state), hardware_panel(state)],
                curve_panels(state),
                [events_panel(state)],
            ]
        return [
            [run_panel(state), progress_panel(state)],
            [training_panel(state), rewards],
            curve_panels(state),
            [hardware_panel(state), events_panel(state)],
        ]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = self.rows()
        heights = [_natural_height(console, options, row) for row in rows]
        available = options.height or (console.height if console.is_alt_screen else None)
        if available is not None:
            others = sum(heights) - heights[self.CURVES_ROW]
            heights[self.CURVES_ROW] = max(available - 1 - others, 5)  # 1: the header line
        layout = Layout()
        layout.split_column(*(Layout(_columns(row), size=height) for row, height in zip(rows, heights, strict=True)))
        yield header(self.state)
        yield from console.render(layout, options.update(height=sum(heights)))


def _natural_height(console: Console, options: ConsoleOptions, row: list[Panel]) -> int:
    width = options.max_width // len(row)
    return max(len(console.render_lines(panel, options.update(width=width, height=None), pad=False)) for panel in row)


def _columns(row: list[Panel]) -> Layout:
    layout = Layout()
    layout.split_row(*(Layout(panel) for panel in row))
    return layout


class ComparisonView:
    """Several runs side by side, one column each: task loss curves on one shared scale and step range,
    so E2E and LoPT compare by eye, then the numbers and the memory columns (relative to the E2E run
    among them). Given a height (a full screen), the curves take what the rows leave."""

    NATURAL_CURVE_HEIGHT = 8

    def __init__(self, runs: list[tuple[str, DashboardState]]):
        self.runs = runs

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        title = Text(" lopt watch ", style="bold reverse") + Text(f"  {len(self.runs)} runs")
        table = self.table(self.NATURAL_CURVE_HEIGHT)
        available = options.height or (console.height if console.is_alt_screen else None)
        if available is not None:
            spare = available - 1 - len(console.render_lines(table, options.update(height=None), pad=False))
            table = self.table(max(self.NATURAL_CURVE_HEIGHT + spare, 3))
        yield title
        yield table

    def table(self, curve_height: int) -> Table:
        states = [state for _, state in self.runs]
        losses = [value for state in states for value in state.task_loss.values()]
        low, high = (min(losses), max(losses)) if losses else (None, None)
        steps = step_range(states)
        table = Table(expand=True, title="task loss, memory and speed by run", title_style="bold")
        table.add_column("", no_wrap=True, style="bold")
        for name, _ in self.runs:
            table.add_column(name, ratio=1, overflow="ellipsis", no_wrap=True)
        scale = [""] * curve_height  # the shared scale: its top, its name, its bottom
        scale[0], scale[curve_height // 2], scale[-1] = f"↑ {format_value(high)}", "task loss", f"↓ {format_value(low)}"
        table.add_row(
            "\n".join(scale),
            *(Curve(s.task_loss, steps, low, high, axes=False, natural_height=curve_height) for s in states),
        )
        table.add_row(
            "", *(Text(f"steps {steps[0]}-{steps[1]}" if s.task_loss.points else "", style="dim") for s in states)
        )
        e2e = next((s for s in states if s.run is not None and s.run.method == "e2e"), None)
        for label, cell in self._rows(e2e, states):
            table.add_row(label, *(cell(state) for state in states))
        return table

    @staticmethod
    def _rows(e2e: DashboardState | None, states: list[DashboardState]):
        def steps(s: DashboardState) -> str:
            total, estimated = s.total_steps()
            done = "  finished" if s.finished else ""
            return f"{s.step} / {'~' * estimated}{total}{done}" if total else f"{s.step}{done}"

        def recon(s: DashboardState) -> str:
            return "  ".join(f"b{i + 1} {format_value(series.last())}" for i, series in enumerate(s.aux_losses)) or "-"

        def versus_e2e(s: DashboardState) -> str:
            if s is e2e:
                return "baseline"
            if e2e is None or not e2e.peak_activation_bytes or not s.peak_activation_bytes:
                return "-"
            return f"{s.peak_activation_bytes / e2e.peak_activation_bytes:.0%} of E2E"

        def tokens(s: DashboardState) -> str:
            return "-" if s.metrics is None else f"{s.metrics.tokens_per_s:,.0f}"

        def last_of(column: str):
            return lambda s: format_value(s.recipe_series[column].last(), 3) if column in s.recipe_series else "-"

        rewards = [column for column in RL_SERIES if any(column in s.recipe_series for s in states)]
        return [
            ("method", method_label),
            ("step", steps),
            ("task loss", lambda s: loss_change(s.task_loss)),
            ("recon loss", recon),
            *((column.replace("_", " "), last_of(column)) for column in rewards),
            ("tokens/s", tokens),
            ("elapsed", lambda s: format_duration(s.elapsed_s) if s.metrics is not None else "-"),
            ("peak memory", lambda s: format_bytes(s.peak_mem_bytes or None)),
            ("activations", lambda s: format_bytes(s.peak_activation_bytes or None)),
            ("vs E2E", versus_e2e),
        ]


def summary(state: DashboardState) -> RenderableType:
    """What stays on the terminal after a live run: where it got to, the final numbers, the last events."""
    total, _ = state.total_steps()
    reached = (
        f"finished {state.step} steps"
        if total and state.step >= total
        else f"stopped at step {state.step} of {total or '?'}"
    )
    grid = _grid(None, 1)
    grid.add_row("steps", f"{reached} in {format_duration(state.elapsed_s)}")
    grid.add_row("task loss", loss_change(state.task_loss))
    for i, series in enumerate(state.aux_losses):
        grid.add_row(f"recon · block {i + 1}", format_value(series.last()))
    for name, series in state.recipe_series.items():
        grid.add_row(name.replace("_", " "), format_value(series.last(), 3))
    grid.add_row("peak memory", format_bytes(state.peak_mem_bytes or None))
    grid.add_row("activations", format_bytes(state.peak_activation_bytes or None) + "  peak saved for backward")
    if state.peak_rss_bytes:
        grid.add_row("process RSS", f"{format_bytes(state.peak_rss_bytes)} peak sampled")
    if state.run is not None:
        grid.add_row("output", f"{state.run.output_dir} (metrics.jsonl, checkpoints: {len(state.checkpoints)})")
    body = [grid]
    last = event_lines(state)[-6:]
    for line in last:  # what stays on the terminal is read in full: the resume command above all
        line.no_wrap, line.overflow = False, "fold"
    if last:
        body += [Text("last events", style="bold"), *last]
    return _panel(Group(*body), f"lopt {state.recipe} · {method_label(state)}")
