"""Writing run outputs so that a kill mid-write never leaves something that looks complete.

A checkpoint is built in a temporary sibling folder, fsynced, and renamed into place. The final model
goes into `--output_dir` itself (the Hugging Face convention), file by file, with `config.json`
moved last: a folder that has a config has its weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

TRAINING_STATE = "training_state.pt"


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_in_temp(parent: Path, write: Callable[[Path], None]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint should be readable like any other folder
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, training_state: dict) -> Path:
    """Write `checkpoint-<step>/`: the plain HF model and tokenizer, plus the state needed to resume."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder, tokenizer)
        torch.save(training_state, folder / TRAINING_STATE)

    final = output_dir / f"checkpoint-{step}"
    tmp = _build_in_temp(output_dir, write)
    if final.exists():  # only a re-run with --overwrite_output_dir gets here
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_final_model(output_dir: Path, model, tokenizer) -> None:
    tmp = _build_in_temp(output_dir, lambda folder: model.save_pretrained(folder, tokenizer))
    files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # config.json last
    for path in files:
        os.replace(path, output_dir / path.name)
    tmp.rmdir()
