"""One configuration's measurement: its training step, as `lopt sft` takes it, timed and accounted by hooks.

A configuration is a variant of lopt.study.variants (the SFT config fields that make it) at a block count. Its model
and task loss are built by training/run.py, as `lopt sft` builds them, and its step is training/step.py's
`forward_backward` followed by the backend's step (or, with --block_step, each block's step as its backward ends):
the benchmark measures the step that training runs, not a copy of it.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lopt.config import SFTConfig
from lopt.data.collate import IGNORE_INDEX
from lopt.models.local_learning import LocalLearningLM
from lopt.parallel.replicated import ReplicatedBackend
from lopt.study.variants import VARIANTS, config_fields, is_lopt
from lopt.training.loss import causal_lm_loss_sum
from lopt.training.memory import GradientMeter, SavedTensorMeter, device_peak_bytes
from lopt.training.optim import build_optimizer, optimizer_state_bytes
from lopt.training.run import sft_task_loss, wrap_model
from lopt.training.step import StepResult, forward_backward
from lopt.training.task_loss import TaskLoss

Batch = dict[str, torch.Tensor]
# Every row trains at one constant rate: the benchmark measures memory and time, not what the variant learns.
LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class Configuration:
    method: str  # a variant's name (lopt.study.variants.VARIANTS)
    num_blocks: int  # 1 for e2e

    def sft_config(self, liger: bool = False) -> SFTConfig:
        """The variant as `lopt sft` would train it here: at this block count and the benchmark's constant rate, in
        float32, without clipping. Its backward mode, checkpointing, adapters, KL, block steps and optimizer are the
        variant's fields, read from here."""
        fields = config_fields(VARIANTS[self.method], LEARNING_RATE)
        return SFTConfig(
            **{**fields, "num_blocks": self.num_blocks, "learning_rate": LEARNING_RATE},
            max_grad_norm=0.0, bf16=False, liger=liger,
        )  # fmt: skip

    @property
    def label(self) -> str:
        return self.method if self.num_blocks == 1 else f"{self.method} k={self.num_blocks}"


def configurations(methods: list[str], blocks: list[int]) -> list[Configuration]:
    """Each method at each LoPT block count; the end-to-end ones once, at one block."""
    return [Configuration(m, k) for m in methods for k in (blocks if is_lopt(m) else [1])]


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
    def label(self) -> str:
        return self.method if self.k == 1 else f"{self.method} k={self.k}"

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


def peak_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"


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


class TrainingStep:
    """`lopt sft`'s optimizer step for one wrapped model and its config, on one process: forward_backward, then the
    replicated backend's step (reduce, clip, apply, zero), or with --block_step each block's step right after its
    backward. The backend is made from the config as `lopt sft` makes it on one process."""

    def __init__(self, model: LocalLearningLM, config: SFTConfig, task_loss: TaskLoss):
        self.model, self.config, self.task_loss = model, config, task_loss
        self.backend = ReplicatedBackend(next(model.parameters()).device, config)
        self.backend.prepare_model(model)
        self.optimizer = build_optimizer(model, config.learning_rate, config.lr_k1, config.weight_decay, config.optim)
        self.backend.prepare_optimizer(model, self.optimizer)
        self.blocks = model.block_parameters()  # built once, not timed

    def __call__(
        self, batch: Batch, meter: SavedTensorMeter | None = None, gradients: GradientMeter | None = None
    ) -> StepResult:
        """One step on `batch`; its saved activations and gradients counted by `meter` and `gradients`, if given."""
        step_block = None
        if self.config.block_step:

            def step_block(block: int) -> None:
                self.backend.step_block(self.blocks[block], self.optimizer, _measured_not_checked)
                if gradients is not None:
                    gradients.freed(self.blocks[block])

        with ExitStack() as counting:
            for counter in (meter, gradients):
                if counter is not None:
                    counting.enter_context(counter.active())
            counting.enter_context(self.backend.autocast())
            result = forward_backward(
                self.model, [batch], self.config.backward, self.backend.backward, self.task_loss,
                self.backend.lm_head_context, step_block,
            )  # fmt: skip
        if not self.config.block_step:  # with block steps every block has stepped already
            self.backend.step(self.model, self.optimizer, _measured_not_checked)
        if gradients is not None:
            gradients.freed(self.model.parameters())
        return result


def _measured_not_checked(*_norms, **_when) -> None:
    """The benchmark's finite check: none. It measures a step; stopping on a non-finite loss is training's concern."""


def measure(
    base, config: Configuration, batch: int, seq: int, steps: int, warmup: int, liger: bool = False, reference=None
) -> Record:
    """Train `base` (made `config`'s variant) for warmup + steps steps on one synthetic batch; `reference` is the
    frozen starting model of `e2e+kl`."""
    device = base.device
    sft_config = config.sft_config(liger)
    torch.manual_seed(0)
    model = wrap_model(base, sft_config, device)
    step = TrainingStep(model, sft_config, sft_task_loss(sft_config, model, device, starting=reference))
    data = synthetic_batch(batch, seq, base.config.vocab_size, device)
    meter = SavedTensorMeter(model.parameters())
    gradients = GradientMeter(model.parameters(), saved=meter)
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = step(data, meter, gradients).task_loss
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    parameter_bytes = sum(  # every weight held, the KL's frozen reference included
        p.numel() * p.element_size() for m in (model, reference) if m is not None for p in m.parameters()
    )
    state_bytes = optimizer_state_bytes(step.optimizer)
    # the untimed accounting step at a smaller batch, with the optimizer's state already there
    small = 1 if batch > 1 else 2
    small_meter = SavedTensorMeter(model.parameters())
    small_gradients = GradientMeter(model.parameters(), saved=small_meter)
    step(synthetic_batch(small, seq, base.config.vocab_size, device), small_meter, small_gradients)
    small_state_bytes = optimizer_state_bytes(step.optimizer)  # the same, unless 8-bit state came in with this step
    return Record(
        config.method, config.num_blocks, sft_config.backward, sft_config.gradient_checkpointing, batch, seq,
        meter.peak_bytes, device_peak_bytes(device), peak_kind(device), step_s, batch * seq / step_s,
        sum(p.numel() for p in model.parameters() if p.requires_grad), state_bytes, parameter_bytes,
        gradients.peak_bytes, meter.peak_with_gradients_bytes, loss, small_batch=small,
        small_batch_whole_step_bytes=parameter_bytes + small_state_bytes + small_meter.peak_with_gradients_bytes,
        small_batch_activation_bytes=small_meter.peak_bytes, step_times=times,
    )  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
