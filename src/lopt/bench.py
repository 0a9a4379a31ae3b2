"""`lopt bench`: memory and throughput of one training step, E2E vs LoPT, measured side by side.

Two measurements per configuration (method, k, backward mode, checkpointing) and batch shape:
- peak activation memory: the peak of live bytes saved for backward (deterministic, machine-free);
- step time (forward + backward + optimizer step): the median of `--steps` timed steps after
  `--warmup` untimed ones, with the configurations interleaved step by step so that drift of the
  machine's speed hits them all alike.
On CUDA the peak allocated device memory of each configuration's steps is recorded too. Every figure
is also given as a ratio to `e2e` in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lopt.models.lopt import LocalLearningLM
from lopt.models.registry import DEFAULT_MODEL, load_model_and_tokenizer
from lopt.training.memory import SavedTensorMeter
from lopt.training.optim import build_optimizer
from lopt.training.step import forward_backward

console = Console()
METHODS = ("e2e", "e2e+ckpt", "lopt-joint", "lopt", "lopt+ckpt")


@dataclass
class Configuration:
    method: str  # one of METHODS
    num_blocks: int  # 1 for e2e

    @property
    def backward(self) -> str:
        return "joint" if self.method == "lopt-joint" else "local"

    @property
    def checkpointing(self) -> bool:
        return self.method.endswith("+ckpt")

    @property
    def label(self) -> str:
        return self.method if self.num_blocks == 1 else f"{self.method} k={self.num_blocks}"


@dataclass
class Record:
    method: str
    k: int
    backward: str
    checkpointing: bool
    batch: int
    seq: int
    activation_bytes: int
    device_peak_bytes: int | None
    step_s: float
    tokens_per_s: float
    activation_ratio: float | None = None
    step_time_ratio: float | None = None


def configurations(methods: list[str], blocks: list[int]) -> list[Configuration]:
    out = []
    for method in methods:
        ks = [1] if method.startswith("e2e") else blocks
        out.extend(Configuration(method, k) for k in ks)
    return out


def synthetic_batch(batch: int, seq: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens; the first quarter of each sequence is prompt (no loss), as in SFT."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device)}


class _Runner:
    """One configuration: its own copy of the model and optimizer, stepped on demand."""

    def __init__(self, base, config: Configuration, batch: dict[str, torch.Tensor]):
        self.config, self.batch = config, batch
        torch.manual_seed(0)
        self.model = LocalLearningLM(copy.deepcopy(base), num_blocks=config.num_blocks).train()
        if config.checkpointing:
            self.model.enable_gradient_checkpointing()
        self.optimizer = build_optimizer(self.model, 1e-5, None, 0.0)
        self.meter = SavedTensorMeter(self.model.parameters())
        self.times: list[float] = []
        self.device_peak = 0

    def step(self, timed: bool) -> None:
        device = self.batch["input_ids"].device
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with self.meter.active():
            forward_backward(self.model, [self.batch], self.config.backward)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            self.device_peak = max(self.device_peak, torch.cuda.max_memory_allocated(device))
        if timed:
            self.times.append(time.perf_counter() - start)


def run_bench(model_name: str, methods: list[str], blocks: list[int], batches: list[int], seqs: list[int],
              steps: int, warmup: int, device: torch.device) -> list[Record]:
    base, _ = load_model_and_tokenizer(model_name, device=device)
    records = []
    for batch_size in batches:
        for seq in seqs:
            batch = synthetic_batch(batch_size, seq, base.config.vocab_size, device)
            runners = [_Runner(base, c, batch) for c in configurations(methods, blocks)]
            for i in range(warmup + steps):
                for runner in runners:  # interleaved: machine drift hits every configuration alike
                    runner.step(timed=i >= warmup)
            for r in runners:
                step_s = statistics.median(r.times)
                records.append(Record(
                    r.config.method, r.config.num_blocks, r.config.backward, r.config.checkpointing, batch_size, seq,
                    r.meter.peak_bytes, r.device_peak if device.type == "cuda" else None, step_s,
                    batch_size * seq / step_s,
                ))
            del runners
    _add_ratios(records)
    return records


def _add_ratios(records: list[Record]) -> None:
    for r in records:
        e2e = next((x for x in records if x.method == "e2e" and (x.batch, x.seq) == (r.batch, r.seq)), None)
        if e2e is not None:
            r.activation_ratio = r.activation_bytes / e2e.activation_bytes
            r.step_time_ratio = r.step_s / e2e.step_s


def print_table(records: list[Record]) -> None:
    table = Table(title="lopt bench: one training step (forward + backward + optimizer)")
    for column in ("config", "batch x seq", "activation MiB", "x e2e", "device peak MiB", "step s", "x e2e", "tokens/s"):
        table.add_column(column, justify="right")
    for r in records:
        label = r.method if r.k == 1 else f"{r.method} k={r.k}"
        table.add_row(
            label, f"{r.batch} x {r.seq}", f"{r.activation_bytes / 2**20:.1f}", _ratio(r.activation_ratio),
            "-" if r.device_peak_bytes is None else f"{r.device_peak_bytes / 2**20:.0f}",
            f"{r.step_s:.3f}", _ratio(r.step_time_ratio), f"{r.tokens_per_s:.0f}",
        )
    console.print(table)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lopt bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=_int_list, default=[4], help="comma-separated batch sizes (default: 4)")
    parser.add_argument("--seq", type=_int_list, default=[256], help="comma-separated sequence lengths (default: 256)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--blocks", type=_int_list, default=[2, 4], help="LoPT block counts (default: 2,4)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json (default: outputs/bench)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    records = run_bench(args.model_name_or_path, methods, args.blocks, args.batch, args.seq, args.steps,
                        args.warmup, torch.device(args.device))
    print_table(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    console.print(f"wrote {out / 'bench.json'}")
