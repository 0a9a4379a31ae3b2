"""`lopt bench`'s plot: activation memory and step time of each record relative to `e2e`."""

from __future__ import annotations

from pathlib import Path

from lopt.tools.bench.measure import Record


def plot(records: list[Record], path: Path) -> bool:
    """Bars of activation memory and step time relative to e2e; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r.label}\n{r.batch}x{r.seq}" for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(records) * 1.1), 4.5))
    for ax, key, title in (
        (axes[0], "activation_ratio", "peak activation memory / e2e"),
        (axes[1], "step_time_ratio", "step time / e2e"),
    ):
        ax.bar(range(len(records)), [getattr(r, key) or 0 for r in records], color="#4a7fb5")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(records)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
