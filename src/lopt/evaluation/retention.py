"""Retention: perplexity on general English text that no training preset contains.

Fine-tuning on a narrow task can make a model worse at everything else; the change of its
perplexity on unrelated text, relative to the model it started from, measures how much it kept.
The default text is the public-domain novella "In the Year 2889" (Project Gutenberg) that
reasoning-gym ships as package data, so the measurement needs no network.
"""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lopt.errors import LoptError

DEFAULT_SOURCE = "reasoning_gym/data/in_the_year_2889.txt"
_GUTENBERG_START = "*** START OF"
_GUTENBERG_END = "*** END OF"


def _gutenberg_body(text: str) -> str:
    """The book without Project Gutenberg's licence header and footer (text without them is kept whole)."""
    start, end = text.find(_GUTENBERG_START), text.find(_GUTENBERG_END)
    if start == -1 or end == -1:
        return text
    return text[text.index("\n", start) + 1 : end]


def retention_text(path: str | Path | None = None) -> str:
    """The text to measure on: `path` (--retention_file) or the default novella."""
    if path is None:
        return _gutenberg_body(
            importlib.resources.files("reasoning_gym").joinpath("data/in_the_year_2889.txt").read_text()
        )
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoptError(f"--retention_file {path}: no such file; pass a UTF-8 text file.") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise LoptError(f"--retention_file {path}: not a UTF-8 text file ({error}).") from None
    return _gutenberg_body(text)


def token_windows(tokenizer, text: str, window: int, max_windows: int) -> torch.Tensor:
    """The text's tokens cut into up to `max_windows` consecutive, non-overlapping windows of `window` tokens.

    Fixed windows (not one per sentence or per paragraph) make the numbers comparable across models
    that share a tokenizer; a partial last window is dropped so that every window weighs the same.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = min(len(ids) // window, max_windows)
    if count == 0:
        raise LoptError(
            f"the retention text has {len(ids)} tokens, fewer than one window of {window}; "
            "pass a longer --retention_file or a smaller --retention_window."
        )
    return torch.tensor(ids[: count * window]).view(count, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of every window."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def relative_change(value: float, base: float) -> float:
    """(value - base) / base: +0.05 means 5% higher perplexity than the starting model (it forgot)."""
    return (value - base) / base
