"""`lopt bench --packing_data`: real (non-padding) tokens per second of a training pass, unpacked and packed.

Each pass trains a fresh copy of the model through the same step as every other row (measure.TrainingStep) over the
same tokenized examples, batched one example a row (padded to the batch's longest) or packed (`pack_examples`).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from lopt.data.collate import collate, pack_examples, tokenize_sft
from lopt.data.presets import load_records
from lopt.models.registry import load_model_and_tokenizer
from lopt.output import console
from lopt.tools.bench.measure import Configuration, TrainingStep, sync
from lopt.training.run import sft_task_loss, wrap_model


def packing_part(
    model_name: str, data: str, samples: int, batch: int, seq: int, num_blocks: int, rounds: int, device: str
) -> list[dict]:
    """Real tokens per second of one training pass over `data`'s first `samples` examples, unpacked and packed, for
    E2E and LoPT with `num_blocks` blocks, each pass on a fresh copy of the model; the variants alternate for
    `rounds` rounds and the median pass counts. Each pass's mean task loss is kept: a pass repeats exactly."""
    base, tokenizer = load_model_and_tokenizer(model_name, device=device)
    source = {"train_file": data} if Path(data).exists() else {"preset": data}
    examples, stats = tokenize_sft(load_records(**source, max_samples=samples), tokenizer, seq)
    variants = {"unpacked": examples, "packed": pack_examples(examples, seq)}
    batches = {
        name: [collate(rows[i : i + batch], tokenizer.pad_token_id) for i in range(0, len(rows), batch)]
        for name, rows in variants.items()
    }
    times: dict[tuple[str, str], list[float]] = {}
    losses: dict[tuple[str, str], list[float]] = {}
    for round_index in range(rounds):
        for configuration in (Configuration("e2e", 1), Configuration("lopt", num_blocks)):
            method = configuration.method
            for variant, data_batches in batches.items():
                console.print(f"packing round {round_index + 1}/{rounds}: {method} {variant}")
                seconds, loss = _pass(base, configuration, data_batches)
                times.setdefault((method, variant), []).append(seconds)
                losses.setdefault((method, variant), []).append(loss)
    rows = []
    for (method, variant), measured in times.items():
        slots = sum(b["input_ids"].numel() for b in batches[variant])
        seconds = statistics.median(measured)
        rows.append({
            "method": method if method == "e2e" else f"lopt k={num_blocks}", "variant": variant, "batch": batch,
            "seq": seq, "examples": stats["examples"], "rows": len(variants[variant]), "steps": len(batches[variant]),
            "real_tokens": stats["tokens"], "padding_share": 1 - stats["tokens"] / slots, "pass_s": seconds,
            "pass_times": measured, "real_tokens_per_s": stats["tokens"] / seconds,
            "pass_task_loss": losses[(method, variant)],  # per trained token, each pass: the same every round
        })  # fmt: skip
    for row in rows:
        unpacked = next(r for r in rows if r["method"] == row["method"] and r["variant"] == "unpacked")
        row["tokens_per_s_ratio"] = row["real_tokens_per_s"] / unpacked["real_tokens_per_s"]
    return rows


def _pass(base, configuration: Configuration, data_batches: list[dict]) -> tuple[float, float]:
    """One training pass of `configuration` over `data_batches` on a fresh copy of `base`: its seconds and its mean
    task loss per trained token. A fresh copy, because wrapping hooks the layers and unties the head, which must not
    carry over; the same seed, so the reconstruction heads start alike."""
    config = configuration.sft_config()
    torch.manual_seed(0)
    model = wrap_model(copy.deepcopy(base), config, base.device)
    step = TrainingStep(model, config, sft_task_loss(config, model, base.device))
    sync(base.device)
    start, loss_sum, trained = time.perf_counter(), 0.0, 0
    for data_batch in data_batches:
        result = step({key: t.to(base.device) for key, t in data_batch.items()})
        loss_sum, trained = loss_sum + result.task_loss * result.tokens, trained + result.tokens
    sync(base.device)
    return time.perf_counter() - start, loss_sum / trained
