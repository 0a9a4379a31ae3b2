"""Tiny data sets the tests train on, and the command-line flags of a tiny `lopt sft` run on them."""

from __future__ import annotations

import json
from pathlib import Path

# Alpaca-style records: twelve sums, short enough for --max_seq_length 64.
SFT_RECORDS = [
    {"instruction": f"What is {a} + {b}?", "input": "", "output": f"The answer is {a + b}."}
    for a in range(4)
    for b in range(3)
]
# Prompt / completion records: twelve one-token answers, what the multi-process runs train on.
SAY_RECORDS = [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(12)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def sft_paths(model_dir: Path, train_file: Path, out: Path) -> list[str]:
    """The model, data and output folder of an `lopt sft` run."""
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out)]


def sft_args(model_dir: Path, train_file: Path, out: Path, *extra: str) -> list[str]:
    """A tiny `lopt sft` run's flags (after the command name): short sequences, 2 per batch, a fast learning rate."""
    return [
        *sft_paths(model_dir, train_file, out),
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        *extra,
    ]
