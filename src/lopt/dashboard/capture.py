"""While the dashboard owns the screen, the process's own terminal output becomes dashboard events.

Anything written to the terminal under a full-screen display scrolls it or is painted over by the next
frame, so for as long as the dashboard runs: `sys.stdout` and `sys.stderr` are replaced by line
collectors (print, rich consoles that write to sys.stderr, warnings, the signal handler's messages and
its resume command), and the logging handlers that write to the terminal are swapped for one handler
that posts records at or above a level (`QueueLogHandler`). `uninstall()` puts everything back.
Output written to file descriptors 1/2 below Python (C libraries) is not caught: the next frame
paints over it.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Callable

Post = Callable[[str, str], None]  # (kind, text) -> an event; never blocks


class LineCollector(io.TextIOBase):
    """A text stream that posts each completed line; a carriage return restarts the line, so a progress
    bar redrawn in place (tqdm) posts nothing until it ends its line."""

    def __init__(self, post: Post, kind: str, encoding: str):
        self.post, self.kind, self._encoding = post, kind, encoding
        self.pending = ""

    @property
    def encoding(self) -> str:
        return self._encoding

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # so libraries write plain lines, without colour codes or in-place redraws

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1].rstrip()
            if line:
                self.post(self.kind, line)
        self.pending = self.pending.rsplit("\r", 1)[-1]
        return len(text)


class QueueLogHandler(logging.Handler):
    """Posts each log record at or above `level` as an event of its level's name."""

    def __init__(self, post: Post, level: int | str = logging.WARNING):
        super().__init__(level)
        self.post = post
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.post(record.levelname, self.format(record))
        except Exception:
            self.handleError(record)


def _terminal_handlers(logger: logging.Logger, streams: tuple) -> list[logging.Handler]:
    return [
        handler
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and handler.stream in streams
    ]


class TerminalCapture:
    """`install()` routes the terminal output into `post`; `uninstall()` (idempotent, any thread) restores it."""

    def __init__(self, post: Post, log_level: int | str = logging.WARNING):
        self.post = post
        self.handler = QueueLogHandler(post, log_level)
        self._lock = threading.Lock()
        self._installed = False
        self._streams: tuple = ()
        self._removed: list[tuple[logging.Logger, logging.Handler]] = []
        self._added_to: list[logging.Logger] = []

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            self._streams = (sys.stdout, sys.stderr)
            terminal = (*self._streams, sys.__stdout__, sys.__stderr__)
            known = list(logging.Logger.manager.loggerDict.values())  # a copy: other threads may add loggers
            loggers = [logging.getLogger()] + [logger for logger in known if isinstance(logger, logging.Logger)]
            for logger in loggers:
                for handler in _terminal_handlers(logger, terminal):
                    logger.removeHandler(handler)
                    self._removed.append((logger, handler))
                    # records stop at a logger that does not propagate (transformers' own), so listen there too
                    if not logger.propagate and logger not in self._added_to:
                        self._added_to.append(logger)
            root = logging.getLogger()
            if root not in self._added_to:
                self._added_to.append(root)
            for logger in self._added_to:
                logger.addHandler(self.handler)
            sys.stdout = LineCollector(self.post, "stdout", getattr(sys.stdout, "encoding", "utf-8"))
            sys.stderr = LineCollector(self.post, "stderr", getattr(sys.stderr, "encoding", "utf-8"))
            self._installed = True

    def uninstall(self) -> None:
        with self._lock:
            if not self._installed:
                return
            sys.stdout, sys.stderr = self._streams
            for logger in self._added_to:
                logger.removeHandler(self.handler)
            for logger, handler in self._removed:
                logger.addHandler(handler)
            self._removed, self._added_to = [], []
            self._installed = False
