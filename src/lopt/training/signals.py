"""SIGINT / SIGTERM: finish the optimizer step in flight, save a checkpoint, say how to resume."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """While entered, the first SIGINT/SIGTERM only sets `requested`; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: the user wants out now, without saving
            # An exception, not the signal's default action, so that `finally` blocks still run: a
            # full-screen dashboard gives the terminal back, a half-built checkpoint folder is removed.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested, self.signum = True, signum
        print(
            f"\nlopt: {signal.Signals(signum).name} received; finishing this step and saving a checkpoint "
            "(send it again to stop at once, without saving)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def exit_after_save(self, checkpoint: Path | None, step: int) -> None:
        """Exit with 128 + signal number (130 for SIGINT, 143 for SIGTERM), as a shell expects."""
        where = f"saved {checkpoint}" if checkpoint else "nothing saved"
        print(
            f"lopt: stopped after step {step}; {where}. Resume with the same command plus "
            "--resume_from_checkpoint latest",
            file=sys.stderr,
        )
        sys.exit(128 + (self.signum or signal.SIGTERM))
