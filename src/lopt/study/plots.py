"""The study's plots: task accuracy against retention, where in the model each method changed it (per layer), and
the training curves; a method has one colour in every plot."""

from __future__ import annotations

from pathlib import Path

from lopt.study.results import Accuracy, Group, MethodRow
from lopt.tools.reporting import curve


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
