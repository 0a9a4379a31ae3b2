"""The terminal dashboard of a training run, live (`Dashboard`, a listener) or from a run's files (`lopt watch`).

state.py holds what is shown and is updated from events; panels.py draws it; live.py feeds it from the
training loop's listener events on a render thread; watch.py feeds it from the files a run writes
(training_args.json, metrics.jsonl, completions.jsonl) through follow.py's incremental readers;
hardware.py samples the process and the GPUs; capture.py routes the process's terminal output into
the dashboard's events while it owns the screen.
"""

from lopt.dashboard.live import Dashboard, tui_enabled

__all__ = ["Dashboard", "tui_enabled"]
