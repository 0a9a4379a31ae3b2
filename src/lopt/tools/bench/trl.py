"""The `trl-sft` row: TRL's SFTTrainer on the model and batch of the `e2e` row, timed step by step.

Its step is TRL's, not lopt's, so the hooks that account lopt's step do not see it: the row has its step time,
process peak, trainable parameters and loss, and no accounted bytes.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from lopt.data.collate import IGNORE_INDEX
from lopt.models.registry import load_model_and_tokenizer
from lopt.tools.bench.measure import LEARNING_RATE, Record, peak_kind, sync, synthetic_batch
from lopt.training.memory import device_peak_bytes


def measure_trl_sft(job: dict) -> Record:
    """TRL's SFTTrainer for warmup + steps steps on `measure`'s batch: the same rows every step (sequential
    sampling over copies), the prompt quarter out of the loss (completion_mask), fp32, AdamW at the benchmark's
    constant rate, no clipping; TRL's own defaults otherwise (its chunked LM head, its entropy and accuracy metrics)."""
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
            sync(model.device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(model.device)
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        args = TRLSFTConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=total, learning_rate=LEARNING_RATE,
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
        "trl-sft", 1, "joint", False, batch, seq, 0, device_peak_bytes(device), peak_kind(device), step_s,
        batch * seq / step_s, sum(p.numel() for p in model.parameters() if p.requires_grad), 0, 0, 0, 0, losses[-1],
        accounted=False, step_times=timed,
    )  # fmt: skip
