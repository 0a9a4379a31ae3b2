"""`--report_to`: the experiment trackers a run reports to, by name, checked when the flags are parsed (known and
installed, before anything loads). training/trackers.py builds the trackers these names ask for."""

from __future__ import annotations

import importlib
import importlib.util

from lopt.errors import LoptError, unknown_choice

TRACKERS = {
    "trackio": "Trackio, local-first (TRL's recommended tracker): a local database, `trackio show` to view",
    "tensorboard": "TensorBoard event files in <output_dir>/runs/",
    "wandb": "Weights & Biases, offline in <output_dir>/wandb/ unless WANDB_MODE says otherwise",
}
TRACKER_MODULES = {"trackio": "trackio", "tensorboard": "tensorboard", "wandb": "wandb"}
INSTALL = "pip install 'lopt[tracking]'"


def parse_report_to(report_to: str | None) -> list[str]:
    """The trackers `--report_to` names, checked: [] for `none`. Each must be known and installed."""
    names = list(dict.fromkeys(name.strip() for name in (report_to or "none").split(",") if name.strip()))
    if names in ([], ["none"]):
        return []
    if "none" in names:
        raise LoptError(f"--report_to {report_to}: 'none' cannot be combined with trackers; pass one or the other.")
    for name in names:
        if name not in TRACKERS:
            options = {"none": "no tracker (the default)", **TRACKERS}
            raise unknown_choice("--report_to tracker", name, options, "Pass several separated by commas.")
    missing = [name for name in names if importlib.util.find_spec(TRACKER_MODULES[name]) is None]
    if missing:
        raise LoptError(
            f"--report_to {','.join(missing)}: {' and '.join(TRACKER_MODULES[m] for m in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install the trackers with: {INSTALL}"
        )
    return names
