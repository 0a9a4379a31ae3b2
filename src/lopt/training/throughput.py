"""Training throughput for the metrics contract: input tokens per second over each logging window, and the
seconds since training started. A validation's seconds are left out, so the rate is training's alone."""

from __future__ import annotations

import time


class Throughput:
    """Input tokens per second over each logging window, and seconds since training started."""

    def __init__(self, start: float):
        self.start = self.window_start = start
        self.tokens = 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a validation's) out of the window: the rate is training's."""
        self.window_start += seconds

    def rate(self) -> float:
        """The rate since the last call (or the start), which begins the next window."""
        now = time.perf_counter()
        rate = self.tokens / (now - self.window_start)
        self.tokens, self.window_start = 0.0, now
        return rate

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
