"""`lopt bench`: memory and throughput of one training step, E2E vs LoPT, measured side by side.

For each configuration (method, k, backward mode, checkpointing) and batch shape, one training step
(forward + backward + AdamW step) is measured for:
- peak activation memory: the peak of live bytes saved for backward (deterministic, machine-free);
- peak device memory: `torch.cuda.max_memory_allocated` on GPU, the process's peak RSS on CPU;
- step time and tokens/s: the median over `--rounds` x `--steps` timed steps.
Each configuration runs in a fresh subprocess so that peaks never mix, and the configurations are
run round-robin `--rounds` times so that drift of the machine's speed hits them all alike. Every
figure is also given as a ratio to `e2e` at the same batch shape. A second table isolates the loss:
saved bytes of lopt's chunked LM-head cross entropy against full float32 logits. A third pairs
LoPT local backward without checkpointing against E2E with checkpointing: does the memory LoPT saves
let it skip recomputation within E2E+ckpt's memory, and what does that buy in step time?

The baselines users compare LoPT with are rows too: `lora` (E2E with LoRA adapters, peft's defaults as
`lopt sft --use_peft` sets them), `lopt+lora` (LoPT with adapters in every block) and `e2e+kl` (E2E SFT
with --kl_beta 0.1, whose reference is a frozen second copy of the model); for every row the trainable
parameters and the bytes of optimizer state after the step are counted, which is where LoRA saves.
`lopt+bs` is LoPT with --block_step, `+8bit` rows keep AdamW's state in 8 bits (--optim adamw_8bit). `trl-sft` is
TRL's SFTTrainer on the same model and batch (prompt quarter masked, fp32 on CPU, constant rate, no clipping, like
every row): its step time, process peak and loss after the same steps, beside lopt's `e2e`.

The whole step is accounted by hooks, so its figures are the same on every machine: parameters, optimizer state,
the peak of gradients, of activations, and of both alive together. A second, untimed step at a smaller batch gives
each configuration's bytes per sample, from which "the largest micro-batch that fits in B GiB" is computed for
each of `--budgets_gib` (activations grow with the batch, the rest does not).

With `--packing_data` (an SFT file or preset) a last table measures `--packing`: one pass of E2E and LoPT
training over the same tokenized examples, batched one example a row (padded to the batch's longest) and packed
(`pack_examples`), alternating `--rounds` times; it reports padding, optimizer steps, and real (non-padding)
tokens per second, packed over unpacked.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from lopt.config import RunConfig
from lopt.data.collate import IGNORE_INDEX, collate, pack_examples, tokenize_sft
from lopt.data.presets import load_records
from lopt.errors import LoptError
from lopt.keep_previous import keep_previous
from lopt.models.local_learning import LocalLearningLM
from lopt.models.lora import add_lora
from lopt.models.registry import DEFAULT_MODEL, load_model_and_tokenizer
from lopt.parallel.replicated import ReplicatedBackend
from lopt.training.loss import causal_lm_loss_sum, liger_linear_cross_entropy
from lopt.training.memory import GradientMeter, SavedTensorMeter, device_peak_bytes
from lopt.training.optim import build_optimizer, optimizer_state_bytes
from lopt.training.step import forward_backward
from lopt.training.task_loss import CausalLMLoss, FrozenStartingModel, KLRegularizedLoss

# Wide enough for the whole table when printed to a file or a CI log (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 150)
METHODS = (
    "e2e", "e2e+ckpt", "e2e+8bit", "lopt-joint", "lopt", "lopt+ckpt", "lopt+bs", "lopt+bs+8bit", "lora", "lopt+lora",
    "e2e+kl", "trl-sft",
)  # fmt: skip
# one model, one end-to-end block
SINGLE_BLOCK = ("lora", "trl-sft")
# The --lora_* defaults of `lopt sft --use_peft`, so the lora rows measure what a user runs.
LORA_DEFAULTS = SimpleNamespace(**{f.name: f.default for f in fields(RunConfig) if f.name.startswith("lora_")})
KL_BETA = 0.1


@dataclass(frozen=True)
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
    def lora(self) -> bool:
        return self.method in ("lora", "lopt+lora")

    @property
    def kl(self) -> bool:
        return self.method == "e2e+kl"

    @property
    def block_step(self) -> bool:
        return self.method.startswith("lopt+bs")

    @property
    def optim(self) -> str:
        return "adamw_8bit" if self.method.endswith("+8bit") else "adamw_torch"

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
    device_peak_bytes: int
    device_peak_kind: str  # "cuda_max_allocated" or "process_peak_rss"
    step_s: float
    tokens_per_s: float
    trainable_params: int = 0
    optimizer_state_bytes: int = 0
    parameter_bytes: int = 0  # every parameter, frozen ones included
    gradient_peak_bytes: int = 0
    gradients_activations_peak_bytes: int = 0  # gradients and saved activations alive together, at their peak
    final_loss: float = float("nan")  # the task loss of the last timed step
    accounted: bool = True  # False for trl-sft, whose step lopt's hooks do not see
    small_batch: int = 1  # the batch of the untimed accounting step, its whole step's and activation peak's bytes
    small_batch_whole_step_bytes: int = 0
    small_batch_activation_bytes: int = 0
    step_times: list[float] = field(default_factory=list)
    activation_ratio: float | None = None
    device_peak_ratio: float | None = None
    step_time_ratio: float | None = None
    gradients_activations_ratio: float | None = None
    whole_step_ratio: float | None = None

    @property
    def whole_step_bytes(self) -> int:
        """Parameters + optimizer state + the peak of gradients and activations: the step's accounted memory."""
        return self.parameter_bytes + self.optimizer_state_bytes + self.gradients_activations_peak_bytes

    @property
    def activation_bytes_per_sample(self) -> float:
        """The saved activations grow linearly with the batch: their growth per sample between the measured batches."""
        return (self.activation_bytes - self.small_batch_activation_bytes) / (self.batch - self.small_batch)

    def largest_batch(self, budget_bytes: float) -> int:
        """A micro-batch at this sequence length whose accounted step surely fits in `budget_bytes` (0: not even one
        sample), and the largest such by the accounting.

        The step's peak is the largest, over the step, of gradients + activations alive, and the activations at any
        moment grow linearly with the batch, so the peak is convex in the batch and grows per sample by at most the
        activation peak's growth: above the larger measured batch that bounds it; between the two measured batches
        the line through them does."""
        (lo, lo_bytes), (hi, hi_bytes) = sorted(
            [(self.small_batch, self.small_batch_whole_step_bytes), (self.batch, self.whole_step_bytes)]
        )
        if budget_bytes >= hi_bytes:
            return hi + math.floor((budget_bytes - hi_bytes) / max(self.activation_bytes_per_sample, 1.0))
        if budget_bytes < lo_bytes:
            return lo - 1  # the smaller measured batch is 1 or 2, and a step grows with its batch
        return lo + math.floor((budget_bytes - lo_bytes) / ((hi_bytes - lo_bytes) / (hi - lo)))


def configurations(methods: list[str], blocks: list[int]) -> list[Configuration]:
    return [Configuration(m, k) for m in methods for k in ([1] if m.startswith("e2e") or m in SINGLE_BLOCK else blocks)]


def synthetic_batch(batch: int, seq: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens; the first quarter of each sequence is prompt (no loss), as in SFT."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[:, : seq // 4] = IGNORE_INDEX
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }


def measure(
    base, config: Configuration, batch: int, seq: int, steps: int, warmup: int, liger: bool = False, reference=None
) -> Record:
    """Train `base` (wrapped as `config`) for warmup + steps steps on one synthetic batch; `reference` is the
    frozen starting model of `e2e+kl`."""
    device = base.device
    torch.manual_seed(0)
    if config.lora:
        base = add_lora(base, LORA_DEFAULTS)
    model = LocalLearningLM(base, num_blocks=config.num_blocks).train()
    task_loss = (
        KLRegularizedLoss(beta=KL_BETA, reference=FrozenStartingModel(reference))
        if config.kl
        else CausalLMLoss(liger=liger)
    )
    if config.checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = build_optimizer(model, 1e-5, None, 0.0, config.optim)
    data = synthetic_batch(batch, seq, base.config.vocab_size, device)
    meter = SavedTensorMeter(model.parameters())
    gradients = GradientMeter(model.parameters(), saved=meter)
    step_block = _block_stepper(model, optimizer, gradients) if config.block_step else None  # built once, not timed
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss = _step(model, optimizer, data, config, task_loss, meter, gradients, step_block)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    parameter_bytes = sum(  # every weight held, the KL's frozen reference included
        p.numel() * p.element_size() for m in (model, reference) if m is not None for p in m.parameters()
    )
    state_bytes = optimizer_state_bytes(optimizer)
    # the untimed accounting step at a smaller batch, with the optimizer's state already there
    small = 1 if batch > 1 else 2
    small_meter = SavedTensorMeter(model.parameters())
    small_gradients = GradientMeter(model.parameters(), saved=small_meter)
    small_data = synthetic_batch(small, seq, base.config.vocab_size, device)
    small_step_block = _block_stepper(model, optimizer, small_gradients) if config.block_step else None
    _step(model, optimizer, small_data, config, task_loss, small_meter, small_gradients, small_step_block)
    small_state_bytes = optimizer_state_bytes(optimizer)  # the same, unless 8-bit state came in with this step
    return Record(
        config.method,
        config.num_blocks,
        config.backward,
        config.checkpointing,
        batch,
        seq,
        meter.peak_bytes,
        device_peak_bytes(device),
        "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        step_s,
        batch * seq / step_s,
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        state_bytes,
        parameter_bytes,
        gradients.peak_bytes,
        meter.peak_with_gradients_bytes,
        loss,
        small_batch=small,
        small_batch_whole_step_bytes=parameter_bytes + small_state_bytes + small_meter.peak_with_gradients_bytes,
        small_batch_activation_bytes=small_meter.peak_bytes,
        step_times=times,
    )


def _step(model, optimizer, data, config: Configuration, task_loss, meter, gradients, step_block) -> float:
    """One training step, its saved activations and gradients counted by `meter` and `gradients`; the task loss."""
    with meter.active(), gradients.active():
        result = forward_backward(model, [data], config.backward, task_loss=task_loss, step_block=step_block)
    optimizer.step()  # after block steps every gradient is gone: the optimizer has nothing left to step
    optimizer.zero_grad(set_to_none=True)
    gradients.freed(model.parameters())
    return result.task_loss


def _block_stepper(model: LocalLearningLM, optimizer: torch.optim.Optimizer, gradients: GradientMeter):
    """`lopt sft --block_step`'s per-block step (the replicated backend's, no clipping), telling `gradients` what
    it frees."""
    backend = ReplicatedBackend(next(model.parameters()).device, SimpleNamespace(max_grad_norm=0, fp16=False))
    blocks = model.block_parameters()

    def step_block(block: int) -> None:
        backend.step_block(blocks[block], optimizer, lambda norm: None)
        gradients.freed(blocks[block])

    return step_block


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    if job["method"] == "trl-sft":
        print(json.dumps(asdict(measure_trl_sft(job))))
        return
    model, _ = load_model_and_tokenizer(job["model"], device=job["device"])
    configuration = Configuration(job["method"], job["k"])
    reference = load_model_and_tokenizer(job["model"], device=job["device"])[0] if configuration.kl else None
    record = measure(
        model,
        configuration,
        job["batch"],
        job["seq"],
        job["steps"],
        job["warmup"],
        job["liger"],
        reference,
    )
    print(json.dumps(asdict(record)))


def measure_trl_sft(job: dict) -> Record:
    """TRL's SFTTrainer for warmup + steps steps on `measure`'s batch: the same rows every step (sequential
    sampling over copies), the prompt quarter out of the loss (completion_mask), fp32, AdamW at a constant 1e-5,
    no clipping; TRL's own defaults otherwise (its chunked LM head, its entropy and accuracy metrics)."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    model, tokenizer = load_model_and_tokenizer(job["model"], device=job["device"])
    batch, seq, total = job["batch"], job["seq"], job["warmup"] + job["steps"]
    data = synthetic_batch(batch, seq, model.config.vocab_size, torch.device("cpu"))
    rows = {
        "input_ids": data["input_ids"].tolist(),
        "completion_mask": (data["labels"] != IGNORE_INDEX).long().tolist(),
    }
    dataset = Dataset.from_dict({key: values * total for key, values in rows.items()})
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _sync(model.device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(model.device)
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        args = TRLSFTConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=total, learning_rate=1e-5,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
            gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=job["device"] == "cpu", max_length=seq,
            completion_only_loss=True, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.add_callback(StepClock())
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    timed = times[job["warmup"] :]
    step_s = statistics.median(timed)
    device = model.device
    return Record(
        "trl-sft", 1, "joint", False, batch, seq, 0, device_peak_bytes(device),
        "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss", step_s, batch * seq / step_s,
        sum(p.numel() for p in model.parameters() if p.requires_grad), 0, 0, 0, 0, losses[-1], accounted=False,
        step_times=timed,
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


def add_ratios(records: list[Record]) -> None:
    for r in records:
        e2e = next((x for x in records if x.method == "e2e" and (x.batch, x.seq) == (r.batch, r.seq)), None)
        if e2e is None:
            continue
        r.device_peak_ratio = r.device_peak_bytes / e2e.device_peak_bytes
        r.step_time_ratio = r.step_s / e2e.step_s
        if r.accounted:
            r.activation_ratio = r.activation_bytes / e2e.activation_bytes
            r.gradients_activations_ratio = r.gradients_activations_peak_bytes / e2e.gradients_activations_peak_bytes
            r.whole_step_ratio = r.whole_step_bytes / e2e.whole_step_bytes


# The LoPT configurations set against E2E with checkpointing at equal memory.
EQUAL_MEMORY_METHODS = ("lopt", "lopt+bs", "lopt+bs+8bit")


def equal_memory_pairs(records: list[Record]) -> list[dict]:
    """LoPT without checkpointing (plain, with block steps, and with 8-bit state too) against E2E with
    checkpointing, at each batch shape.

    Checkpointing buys memory with recomputation. Where LoPT's accounted step stays within E2E+ckpt's, LoPT gets
    that memory without the recomputation, and the step-time ratio at the same batch says what that buys; the
    largest batch LoPT fits in E2E+ckpt's memory says what else it could do with it.
    """
    pairs = []
    for r in records:
        ckpt = next((x for x in records if x.method == "e2e+ckpt" and (x.batch, x.seq) == (r.batch, r.seq)), None)
        if r.method not in EQUAL_MEMORY_METHODS or ckpt is None:
            continue
        pairs.append(
            {
                "method": r.method,
                "k": r.k,
                "batch": r.batch,
                "seq": r.seq,
                "lopt_whole_step_bytes": r.whole_step_bytes,
                "e2e_ckpt_whole_step_bytes": ckpt.whole_step_bytes,
                "fits_e2e_ckpt_memory": r.whole_step_bytes <= ckpt.whole_step_bytes,
                "largest_batch_in_e2e_ckpt_memory": r.largest_batch(ckpt.whole_step_bytes),
                "lopt_device_peak_bytes": r.device_peak_bytes,
                "e2e_ckpt_device_peak_bytes": ckpt.device_peak_bytes,
                "lopt_activation_bytes": r.activation_bytes,
                "e2e_ckpt_activation_bytes": ckpt.activation_bytes,
                "step_time_ratio": r.step_s / ckpt.step_s,
            }
        )
    return pairs


def fits(records: list[Record], budgets_gib: list[float]) -> list[dict]:
    """Per accounted configuration and sequence length: the largest micro-batch whose step fits in each budget."""
    return [
        {
            "config": r.method if r.k == 1 else f"{r.method} k={r.k}", "seq": r.seq,
            "activation_bytes_per_sample": r.activation_bytes_per_sample,
            "largest_batch": {f"{b:g}": r.largest_batch(b * 2**30) for b in budgets_gib},
        }
        for r in records
        if r.accounted
    ]  # fmt: skip


def loss_part(hidden_size: int, vocab: int, batch: int, seq: int, device: str = "cpu", liger: bool = False) -> dict:
    """Saved-for-backward bytes of the loss alone: chunked (lopt) vs full float32 logits (plain HF),
    and Liger Kernel's fused linear cross entropy when `liger` (CUDA)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device)
    hidden = torch.randn(batch, seq, hidden_size, requires_grad=True, device=device)
    labels = synthetic_batch(batch, seq, vocab, torch.device(device))["labels"]

    def full() -> torch.Tensor:
        logits = head(hidden).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="sum")

    kernels = {"full_logits": full, "chunked": lambda: causal_lm_loss_sum(hidden, head, labels)[0]}
    if liger:
        kernels["liger"] = lambda: causal_lm_loss_sum(hidden, head, labels, liger=True)[0]
    measured = {}
    for name, loss_fn in kernels.items():
        meter = SavedTensorMeter(head.parameters())
        with meter.active():
            loss_fn().backward()
        measured[name] = meter.peak_bytes
    return {
        "batch": batch,
        "seq": seq,
        "vocab": vocab,
        **measured,
        "reduction": measured["full_logits"] / measured["chunked"],
    }


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
        for method, k in (("e2e", 1), ("lopt", num_blocks)):
            for variant, data_batches in batches.items():
                console.print(f"packing round {round_index + 1}/{rounds}: {method} {variant}")
                # a fresh copy each pass: wrapping hooks the layers and unties the head, which must not carry over;
                # the same seed, so the reconstruction heads start alike
                torch.manual_seed(0)
                model = LocalLearningLM(copy.deepcopy(base), num_blocks=k).train()
                optimizer = build_optimizer(model, 1e-5, None, 0.0)
                _sync(base.device)
                start, loss_sum, trained = time.perf_counter(), 0.0, 0
                for data_batch in data_batches:
                    result = forward_backward(model, [{key: t.to(base.device) for key, t in data_batch.items()}])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum, trained = loss_sum + result.task_loss * result.tokens, trained + result.tokens
                _sync(base.device)
                times.setdefault((method, variant), []).append(time.perf_counter() - start)
                losses.setdefault((method, variant), []).append(loss_sum / trained)
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


def print_tables(records: list[Record], losses: list[dict], pairs: list[dict], budgets: list[dict]) -> None:
    table = Table(title="lopt bench: one training step (forward + backward + optimizer step)")
    peak_kind = "device peak MiB" if records[0].device_peak_kind == "cuda_max_allocated" else "process peak RSS MiB"
    for column in (
        "config",
        "batch x seq",
        "activation MiB",
        "x e2e",
        peak_kind,
        "x e2e",
        "step s",
        "x e2e",
        "tokens/s",
        "trainable M",
        "optimizer state MiB",
        "last step's loss",
    ):
        table.add_column(column, justify="right")
    for r in records:
        label = r.method if r.k == 1 else f"{r.method} k={r.k}"
        table.add_row(
            label,
            f"{r.batch} x {r.seq}",
            f"{r.activation_bytes / 2**20:.1f}" if r.accounted else "-",
            _ratio(r.activation_ratio),
            f"{r.device_peak_bytes / 2**20:.0f}",
            _ratio(r.device_peak_ratio),
            f"{r.step_s:.3f}",
            _ratio(r.step_time_ratio),
            f"{r.tokens_per_s:.0f}",
            f"{r.trainable_params / 1e6:.2f}",
            f"{r.optimizer_state_bytes / 2**20:.1f}" if r.accounted else "-",
            f"{r.final_loss:.4f}",
        )
    console.print(table)
    accounting = Table(title="the whole step, accounted (deterministic MiB): parameters + optimizer state + the peak "
                       "of gradients and activations alive together")  # fmt: skip
    for column in ("config", "parameters", "optimizer state", "gradient peak", "activation peak", "grads + acts peak",
                   "x e2e", "whole step", "x e2e"):  # fmt: skip
        accounting.add_column(column, justify="right")
    for r in (r for r in records if r.accounted):
        accounting.add_row(
            r.method if r.k == 1 else f"{r.method} k={r.k}", *(f"{b / 2**20:.1f}" for b in (
                r.parameter_bytes, r.optimizer_state_bytes, r.gradient_peak_bytes, r.activation_bytes,
                r.gradients_activations_peak_bytes)),
            _ratio(r.gradients_activations_ratio), f"{r.whole_step_bytes / 2**20:.1f}", _ratio(r.whole_step_ratio),
        )  # fmt: skip
    console.print(accounting)
    if budgets:
        print_budgets(budgets)
    loss_table = Table(title="the loss alone: saved-for-backward bytes")
    with_liger = "liger" in losses[0]
    for column in ("batch x seq", "vocab", "full fp32 logits MiB", "chunked MiB", "reduction") + (
        ("liger MiB",) if with_liger else ()
    ):
        loss_table.add_column(column, justify="right")
    for r in losses:
        loss_table.add_row(
            f"{r['batch']} x {r['seq']}",
            str(r["vocab"]),
            f"{r['full_logits'] / 2**20:.1f}",
            f"{r['chunked'] / 2**20:.1f}",
            f"{r['reduction']:.1f}x",
            *((f"{r['liger'] / 2**20:.1f}",) if with_liger else ()),
        )
    console.print(loss_table)
    for trl in (r for r in records if r.method == "trl-sft"):
        e2e = next(r for r in records if r.method == "e2e" and (r.batch, r.seq) == (trl.batch, trl.seq))
        console.print(
            f"lopt e2e vs TRL SFTTrainer at {e2e.batch} x {e2e.seq}: step time {e2e.step_s / trl.step_s:.2f}x, "
            f"{peak_kind} {e2e.device_peak_bytes / trl.device_peak_bytes:.2f}x, last step's loss "
            f"{e2e.final_loss:.4f} vs {trl.final_loss:.4f}"
        )
    if not pairs:
        return
    pair_table = Table(title="equal memory: LoPT without checkpointing vs E2E with checkpointing (accounted MiB)")
    for column in (
        "config",
        "batch x seq",
        "lopt whole step",
        "e2e+ckpt whole step",
        "within e2e+ckpt memory",
        "largest batch in it",
        f"lopt {peak_kind}",
        f"e2e+ckpt {peak_kind}",
        "step s lopt / e2e+ckpt",
    ):
        pair_table.add_column(column, justify="right")
    for p in pairs:
        extra = (p["lopt_whole_step_bytes"] - p["e2e_ckpt_whole_step_bytes"]) / 2**20
        pair_table.add_row(
            f"{p['method']} k={p['k']}",
            f"{p['batch']} x {p['seq']}",
            f"{p['lopt_whole_step_bytes'] / 2**20:.0f}",
            f"{p['e2e_ckpt_whole_step_bytes'] / 2**20:.0f}",
            "yes" if p["fits_e2e_ckpt_memory"] else f"no (+{extra:.0f} MiB)",
            str(p["largest_batch_in_e2e_ckpt_memory"]),
            f"{p['lopt_device_peak_bytes'] / 2**20:.0f}",
            f"{p['e2e_ckpt_device_peak_bytes'] / 2**20:.0f}",
            f"{p['step_time_ratio']:.2f}",
        )
    console.print(pair_table)


def print_budgets(rows: list[dict]) -> None:
    budgets = list(rows[0]["largest_batch"])
    table = Table(title="the largest micro-batch whose accounted step fits in B GiB (a lower bound from two measured "
                  "batches: the step grows per sample by at most the activations' growth)")  # fmt: skip
    for column in ("config", "seq", "activation MiB per sample", *(f"{b} GiB" for b in budgets)):
        table.add_column(column, justify="left" if column == "config" else "right")
    for r in rows:
        table.add_row(
            r["config"], str(r["seq"]), f"{r['activation_bytes_per_sample'] / 2**20:.1f}",
            *(str(r["largest_batch"][b]) for b in budgets),
        )  # fmt: skip
    console.print(table)


def print_packing(rows: list[dict]) -> None:
    first = rows[0]
    table = Table(
        title=f"--packing: one training pass over {first['examples']} examples, batch {first['batch']}, "
        f"--max_seq_length {first['seq']}"
    )
    for column in ("config", "data", "rows", "steps", "padding", "pass s", "real tokens/s", "x unpacked"):
        table.add_column(column, justify="left" if column in ("config", "data") else "right")
    for r in rows:
        table.add_row(
            r["method"], r["variant"], str(r["rows"]), str(r["steps"]), f"{r['padding_share']:.1%}",
            f"{r['pass_s']:.2f}", f"{r['real_tokens_per_s']:.0f}", _ratio(r["tokens_per_s_ratio"]),
        )  # fmt: skip
    console.print(table)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(records: list[Record], path: Path) -> bool:
    """Bars of activation memory and step time relative to e2e; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r.method if r.k == 1 else f'{r.method} k={r.k}'}\n{r.batch}x{r.seq}" for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(records) * 1.1), 4.5))
    for ax, key, title in (
        (axes[0], "activation_ratio", "peak activation memory / e2e"),
        (axes[1], "step_time_ratio", "step time / e2e"),
    ):
        ax.bar(range(len(records)), [getattr(r, key) or 0 for r in records], color="#4a7fb5")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(records)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lopt bench", description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    main()
