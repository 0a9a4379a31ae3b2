"""Result files are never replaced silently: an earlier one is renamed aside before a new one is written.

Measurements (`bench.json`, `eval.json`) cannot always be re-made identically (timings, a model since
retrained), so a second run keeps the first one's file under a name with its time, and says so.
"""

from __future__ import annotations

import time
from pathlib import Path


def keep_previous(path: Path) -> Path | None:
    """Rename an existing `path` to `<stem>.<its modification time><suffix>`; return the new path, or None."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while kept.exists():  # two results written within the same second
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    path.rename(kept)
    return kept
