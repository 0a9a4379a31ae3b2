"""Earlier result files are renamed aside, never replaced, even several within one second."""

from __future__ import annotations

import os

from lopt.keep_previous import keep_previous


def test_earlier_results_are_kept_under_distinct_names(tmp_path):
    path = tmp_path / "bench.json"
    assert keep_previous(path) is None  # nothing to keep
    kept = []
    for text in ("first", "second"):
        path.write_text(text)
        os.utime(path, (1_700_000_000, 1_700_000_000))  # the same modification second for both
        kept.append(keep_previous(path))
    assert not path.exists()
    assert [p.read_text() for p in kept] == ["first", "second"]
    assert kept[0] != kept[1] and all(p.suffix == ".json" and p.name.startswith("bench.") for p in kept)
