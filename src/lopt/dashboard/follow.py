"""Incremental reads of the files a run is writing: only what was appended since the last read.

A training run appends one flushed JSON line per row (metrics.jsonl, completions.jsonl), so a reader
may catch a line half written: the part after the last newline is kept until its newline arrives. A
file that shrank was started afresh (a new run in the same folder); it is read again from its start.
"""

from __future__ import annotations

import json
from pathlib import Path


class JsonlFollower:
    """`read_new()` returns the JSON objects of the lines completed since the previous call."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0  # bytes consumed, up to and including the last newline read
        self.partial = b""  # a last line without its newline yet
        self.unreadable_lines = 0  # complete lines that were not a JSON object (reported, then skipped)

    def read_new(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []  # not written yet
        if size < self.offset + len(self.partial):
            self.offset, self.partial = 0, b""
        with self.path.open("rb") as file:
            file.seek(self.offset + len(self.partial))
            appended = file.read()
        *lines, self.partial = (self.partial + appended).split(b"\n")
        self.offset += sum(len(line) + 1 for line in lines)
        rows = []
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # bytes: decoded as UTF-8 only once the line is whole
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                self.unreadable_lines += 1
        return rows
