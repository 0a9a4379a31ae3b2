"""A real terminal for tests: a private tmux server whose screen a test reads (`capture-pane`) and types into."""

from __future__ import annotations

import os
import subprocess
import time


class Terminal:
    """A 160x48 terminal running a plain bash whose prompt is `ready$ `; close() ends the private server."""

    def __init__(self, name: str):
        self.server = ["tmux", "-L", f"lopt-test-{os.getpid()}-{name}"]  # a private tmux server, not the user's
        self.name = name
        shell = "env PS1='ready$ ' bash --norc --noprofile"
        subprocess.run([*self.server, "new-session", "-d", "-s", name, "-x", "160", "-y", "48", shell], check=True)
        self.wait_for("ready$")

    def screen(self) -> str:
        return subprocess.run(
            [*self.server, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True
        ).stdout

    def type(self, *keys: str) -> None:
        subprocess.run([*self.server, "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, *texts: str, seconds: float = 10.0) -> str:
        """The first captured screen that shows every one of `texts`: a screen captured while the program
        is still drawing a frame holds only part of it, so waiting for one text and asserting the others races."""
        shown = ""
        for _ in range(int(seconds * 10)):
            shown = self.screen()
            if all(text in shown for text in texts):
                return shown
            time.sleep(0.1)
        missing = [text for text in texts if text not in shown]
        raise AssertionError(f"{missing!r} never appeared on the terminal:\n{shown}")

    def close(self) -> None:
        subprocess.run([*self.server, "kill-server"], capture_output=True)
