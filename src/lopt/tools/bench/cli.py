"""`lopt bench`'s command line: the flags, the round-robin over configurations, each measured in a subprocess of
its own so that peaks never mix, and bench.json."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lopt.errors import LoptError
from lopt.keep_previous import keep_previous
from lopt.models.registry import DEFAULT_MODEL, load_model_and_tokenizer
from lopt.tools.bench.measure import Configuration, Record, configurations, loss_part, measure
from lopt.tools.bench.packing import packing_part
from lopt.tools.bench.plots import plot
from lopt.tools.bench.tables import add_ratios, console, equal_memory_pairs, fits, print_packing, print_tables
from lopt.tools.bench.trl import measure_trl_sft
from lopt.training.loss import liger_linear_cross_entropy

# The rows `--methods` chooses from, in the tables' order: variants of lopt.study.variants.
METHODS = (
    "e2e", "e2e+ckpt", "e2e+8bit", "lopt-joint", "lopt", "lopt+ckpt", "lopt+bs", "lopt+bs+8bit", "lora", "lopt+lora",
    "e2e+kl", "trl-sft",
)  # fmt: skip


def run_bench(
    model_name: str,
    methods: list[str],
    blocks: list[int],
    batches: list[int],
    seqs: list[int],
    steps: int,
    warmup: int,
    rounds: int,
    device: str,
    liger: bool = False,
) -> list[Record]:
    shapes = [(b, s) for b in batches for s in seqs]
    runs: dict[tuple, list[Record]] = {}
    for round_index in range(rounds):  # round-robin: each round visits every configuration once
        for batch, seq in shapes:
            for config in configurations(methods, blocks):
                console.print(f"round {round_index + 1}/{rounds}: {config.label} at {batch} x {seq}")
                runs.setdefault((config, batch, seq), []).append(
                    _measure_in_subprocess(model_name, config, batch, seq, steps, warmup, device, liger)
                )
    records = []
    for (_config, batch, seq), measured in runs.items():
        first = measured[0]
        first.step_times = [t for r in measured for t in r.step_times]
        first.step_s = statistics.median(first.step_times)
        first.tokens_per_s = batch * seq / first.step_s
        first.device_peak_bytes = max(r.device_peak_bytes for r in measured)
        records.append(first)
    add_ratios(records)
    return records


def _measure_in_subprocess(
    model_name: str, config: Configuration, batch: int, seq: int, steps: int, warmup: int, device: str, liger: bool
) -> Record:
    job = {
        "model": model_name,
        "method": config.method,
        "k": config.num_blocks,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "warmup": warmup,
        "device": device,
        "liger": liger,
    }
    done = subprocess.run(
        [sys.executable, "-m", "lopt.tools.bench", "--child", json.dumps(job)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise LoptError(f"bench of {config.label} at {batch} x {seq} failed:\n{done.stderr[-2000:]}")
    return Record(**json.loads(done.stdout.strip().splitlines()[-1]))


def _child(job: dict) -> None:
    """One configuration's measurement, in the subprocess `_measure_in_subprocess` started: its Record on stdout."""
    if job["method"] == "trl-sft":
        print(json.dumps(asdict(measure_trl_sft(job))))
        return
    model, _ = load_model_and_tokenizer(job["model"], device=job["device"])
    configuration = Configuration(job["method"], job["k"])
    kl = configuration.sft_config().kl_beta > 0  # its frozen reference: a second copy of the starting model
    reference = load_model_and_tokenizer(job["model"], device=job["device"])[0] if kl else None
    record = measure(
        model, configuration, job["batch"], job["seq"], job["steps"], job["warmup"], job["liger"], reference
    )
    print(json.dumps(asdict(record)))


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    # the package's docstring, not this module's, describes the command
    description = sys.modules[__package__].__doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="lopt bench", description=description)
    parser.add_argument("--model_name_or_path", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=_int_list, default=[4], help="comma-separated batch sizes (default: 4)")
    parser.add_argument("--seq", type=_int_list, default=[512], help="comma-separated sequence lengths (default: 512)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--blocks", type=_int_list, default=[2, 4], help="LoPT block counts (default: 2,4)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round (default: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin passes over the configurations (default: 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--liger",
        action="store_true",
        help="train with Liger Kernel's fused linear cross entropy (CUDA; pip install liger-kernel)",
    )
    parser.add_argument(
        "--packing_data",
        help="an SFT data file or preset: also measure --packing's real tokens/s on it (first --batch and --seq)",
    )
    parser.add_argument(
        "--packing_samples", type=int, default=64, help="examples of --packing_data in the pass (default: 64)"
    )
    parser.add_argument(
        "--budgets_gib",
        type=lambda text: [float(x) for x in text.split(",") if x],
        default=[8, 16, 24, 80],
        help="memory budgets (GiB) of the largest-micro-batch table (default: 8,16,24,80)",
    )
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json and bench.png")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "e2e" not in methods:
        parser.error("--methods must include e2e: every ratio is taken against it")
    if args.liger:
        liger_linear_cross_entropy(torch.device(args.device))  # says why not before any configuration runs
    records = run_bench(
        args.model_name_or_path,
        methods,
        args.blocks,
        args.batch,
        args.seq,
        args.steps,
        args.warmup,
        args.rounds,
        args.device,
        args.liger,
    )
    from transformers import AutoConfig

    from lopt.models.registry import resolve_model

    model_config = AutoConfig.from_pretrained(resolve_model(args.model_name_or_path))
    losses = [
        loss_part(model_config.hidden_size, model_config.vocab_size, b, s, args.device, args.liger)
        for b in args.batch
        for s in args.seq
    ]
    pairs = equal_memory_pairs(records)
    budgets = fits(records, args.budgets_gib)
    print_tables(records, losses, pairs, budgets)
    packing = []
    if args.packing_data:
        packing = packing_part(
            args.model_name_or_path, args.packing_data, args.packing_samples, args.batch[0], args.seq[0],
            args.blocks[0], args.rounds, args.device,
        )  # fmt: skip
        print_packing(packing)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model_name_or_path,
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "steps": args.steps,
        "liger": args.liger,
        "records": [{**asdict(r), "whole_step_bytes": r.whole_step_bytes} for r in records],
        "loss": losses,
        "equal_memory": pairs,
        "budgets": budgets,
        "packing": packing,
    }
    for name in ("bench.json", "bench.png"):
        kept = keep_previous(out / name)
        if kept is not None:
            console.print(f"kept the earlier run's {name} as {kept}")
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plotted = plot(records, out / "bench.png")
    console.print(
        f"wrote {out / 'bench.json'}"
        + (f" and {out / 'bench.png'}" if plotted else " (no plot: pip install matplotlib)")
    )
