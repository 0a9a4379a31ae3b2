"""What lopt prints, and what it keeps other libraries from printing.

lopt's own messages go to stderr through `console`, so stdout stays free for results a user pipes.
Quiet by default (`quiet_libraries`): the progress bars and info/warning logs of transformers,
datasets and huggingface_hub, DeepSpeed's accelerator banner, and a few warnings that tell a lopt user
nothing are off; `--log_level debug` (or LOPT_LOG_LEVEL=debug) leaves every library as it is. Only the
main process of a multi-process run speaks. A long phase (loading a model, tokenizing, generating,
saving) is one line with its counts and elapsed time, and on a terminal a spinner while it runs
(`phase`), so a log file of a redirected run reads like the terminal did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator

from rich.console import Console

# soft_wrap: a line is one line in a log file too (rich would cut it at 80 columns there)
console = Console(stderr=True, soft_wrap=True)

LOG_LEVELS = ("debug", "info", "warning")
# Warnings that fire on every run and say nothing a lopt user can act on (each checked against the
# library version that emits it): torch's pin_memory on a machine without an accelerator, and
# transformers' deprecation of a name TRL still uses.
_NOISE = (
    (UserWarning, r".*'pin_memory' argument is set as true but no accelerator is found"),
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated"),
)


def log_level_from(argv: list[str]) -> str:
    """The `--log_level` among a command's flags (the command's own parser checks the value), else
    LOPT_LOG_LEVEL, else info."""
    for i, arg in enumerate(argv):
        if arg == "--log_level" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--log_level="):
            return arg.split("=", 1)[1]
    return os.environ.get("LOPT_LOG_LEVEL", "info")


# The libraries' own switches, read when they are first imported (and inherited by the processes lopt starts);
# a value the user set is kept.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' own bars (loading weights, writing shards) follow it
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def quiet_libraries(level: str = "info") -> None:
    """Keep library bars and logs off the terminal unless `level` is debug; silence ranks other than 0.

    Called before the libraries are imported (the CLI does), it only sets their switches; libraries a
    caller imported already are quieted through their own functions.
    """
    if os.environ.get("RANK", "0") != "0":
        console.quiet = True  # only the main process speaks
    logging.getLogger("lopt").setLevel(logging.WARNING if level == "warning" else logging.INFO)
    if level == "debug":
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.set_verbosity_error()
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if not _cuda_available():
        # DeepSpeed (imported by transformers when it saves a model) warns on every import that it found
        # no GPU; naming the CPU accelerator is what it would pick anyway.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # bitsandbytes (--optim adamw_8bit) warns on import, on CPUs with AVX512-BF16, that an optional kernels
    # package for 4-bit inference is missing: nothing lopt uses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def plural(count: int, noun: str, nouns: str = "") -> str:
    """The count and the noun that agrees with it: "1 step", "2 steps", "1 process" / "2 processes" (`nouns`)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def _cuda_available() -> bool:
    import torch  # the commands that need quieting load it anyway

    return torch.cuda.is_available()


class Phase:
    """One long step of a command; `result` (set by the caller) is said when it ends."""

    def __init__(self, what: str):
        self.what, self.result = what, ""


@contextlib.contextmanager
def phase(what: str) -> Iterator[Phase]:
    """Say `what` is under way (a spinner on a terminal), then one line: what, its `result`, the time it took.

    Nothing is printed for a phase that fails: the error says what went wrong.
    """
    step = Phase(what)
    start = time.perf_counter()
    status = console.status(what) if console.is_terminal and not console.quiet else contextlib.nullcontext()
    with status:
        yield step
    result = f": {step.result}" if step.result else ""
    console.print(f"{what}{result} ({time.perf_counter() - start:.1f} s)", highlight=False)
