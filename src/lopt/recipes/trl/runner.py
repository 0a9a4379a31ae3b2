"""A run of a TRL recipe: processes, output folder, resume, signals, validation summary, final model; and the
trainer built on the wrapper's model with lopt's flags."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, TrainerCallback

from lopt.config import RunConfig
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.output import console, phase, plural
from lopt.parallel import distributed
from lopt.recipes.trl.trackers import trl_reporting
from lopt.runs import write_training_args
from lopt.training.callbacks import Callback, Callbacks
from lopt.training.checkpoint import (
    check_writable,
    find_checkpoint,
    save_final_model,
)
from lopt.training.run import adapter_summary, prepare_output_dir, validation_summary
from lopt.training.signals import StopRequest


class _StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during a TRL run: the Trainer finishes the optimizer step in flight, saves a
    checkpoint and stops (as the SFT loop does). Every process decides together, since a signal may
    reach one process first and saving is a collective."""

    def __init__(self, stop: StopRequest, device: torch.device):
        self.stop, self.device = stop, device
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_process(self.stop.requested, self.device) and state.global_step < state.max_steps:
            # the step in flight is logged and saved whatever --logging_steps / --save_steps say
            control.should_log = control.should_save = control.should_training_stop = self.stopped = True


def pair_datasets(records: list[dict], eval_records: list[dict] | None) -> dict:
    """The train_dataset / eval_dataset arguments of a TRL preference trainer (DPO, reward model)."""
    import datasets

    return {
        "train_dataset": datasets.Dataset.from_list(records),
        "eval_dataset": datasets.Dataset.from_list(eval_records) if eval_records is not None else None,
    }


def build_lopt_trainer(trainer_class, config: RunConfig, wrapper: LocalLearningLM, args, **trl_kwargs):
    """`trainer_class` (a TRL trainer with LoptTrainerMixin) on `wrapper`'s model with lopt's flags; `trl_kwargs` are
    the trainer's own arguments (datasets, tokenizer, rewards). TRL's refusal of the settings or data becomes a
    LoptError that quotes it; a dataset TRL's filters left empty (every record longer than the length limits) is
    refused by name."""
    try:
        trainer = trainer_class(
            model=wrapper.model, args=args, lopt=wrapper, save_total_limit=config.save_total_limit, **trl_kwargs
        )
    except (ValueError, ImportError, TypeError) as error:  # TRL's checks of the settings and the data
        trl_name = next(c.__name__ for c in trainer_class.__mro__[1:] if c.__module__.startswith("trl."))
        raise LoptError(f"TRL's {trl_name} rejected these settings or data: {error}") from error
    for data, what in ((trainer.train_dataset, "train on"), (trainer.eval_dataset, "validate on")):
        if data is not None and len(data) == 0:
            raise LoptError(
                f"TRL left out every record as too long for the length limits, so none is left to {what}; raise "
                "--max_seq_length (or --max_prompt_length)."
            )
    return trainer


@dataclass
class TRLRunResult:
    output_dir: Path
    steps: int
    metrics: list[dict]  # metrics.jsonl: one object per logged step
    elapsed_s: float

    @property
    def first_loss(self) -> float | None:
        return self.metrics[0]["task_loss"] if self.metrics else None

    @property
    def last_loss(self) -> float | None:
        return self.metrics[-1]["task_loss"] if self.metrics else None


def run_trl_recipe(
    recipe, config: RunConfig, build_trainer: Callable, describe: Callable, callbacks: Sequence[Callback] = ()
) -> TRLRunResult:
    """A run of a TRL recipe (`recipe`, its registry record): `build_trainer(config, out, callbacks)` makes the
    trainer, `describe(trainer)` the recipe's part of the start-up line; the rest (processes, output folder, resume,
    training, final model) is shared. `callbacks` listen next to metrics.jsonl, and hear `on_model_saved` once the
    final model is complete. Only the main process writes the run's files."""
    # Join torchrun's process group before anything is written (accelerate then uses this group),
    # so that only the main process checks and creates the output folder.
    distributed.init_from_environment()
    main_process = distributed.is_main_process()
    out = prepare_output_dir(config) if main_process else Path(config.output_dir)
    distributed.barrier()
    resume_dir = find_checkpoint(out, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    trainer = build_trainer(config, out, callbacks)
    wrapper = trainer.lopt
    if main_process:
        check_writable(out, wrapper)
        write_training_args(out, recipe.name, config.to_json())
        console.print(
            f"[bold]lopt {recipe.name}[/]: {config.canonical_method}"
            + (f" k={config.lopt.num_blocks}, {config.lopt.backward} backward" if config.lopt else "")
            + (" | each block clipped by its own gradient norm" if config.lopt and config.lopt.clip_per_block else "")
            + adapter_summary(config, wrapper)
            + f" | {describe(trainer)} | {plural(trainer.accelerator.num_processes, 'process', 'processes')}"
            + f", device {trainer.args.device}"
            + (f" | resuming from {resume_dir}" if resume_dir else "")
        )
    start = time.perf_counter()
    with StopRequest() as stop, trl_reporting(trainer, config):
        stopper = _StopOnSignal(stop, trainer.args.device)
        trainer.add_callback(stopper)
        if config.early_stopping_patience:
            trainer.add_callback(EarlyStoppingCallback(config.early_stopping_patience))
        # TRL's Trainer restores the model (and, through the mixin, the heads), the optimizer, the
        # schedule, the RNG states and the position in the data.
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    if stopper.stopped:
        distributed.barrier()
        stop.exit_after_save(find_checkpoint(out, "latest"), trainer.state.global_step)
    state = trainer.state
    # validated, with checkpoints: the Trainer has recorded the best step (older transformers releases do not)
    if main_process and getattr(state, "best_global_step", None) is not None:
        restored = state.best_model_checkpoint if config.load_best_model_at_end else None
        summary = validation_summary(
            config, state.best_global_step, state.best_metric, state.global_step, state.max_steps,
            Path(restored).name if restored and state.best_global_step != state.global_step else None,
        )  # fmt: skip
        console.print(summary, highlight=False)
    if main_process:
        if config.merge_lora:
            wrapper.merge_adapters()
        with phase(f"saving the model to {out}"):
            save_final_model(out, wrapper, trainer.processing_class)
    distributed.barrier()
    if main_process:  # e.g. publishing: lopt's card replaces the one TRL writes with each checkpoint
        Callbacks(list(callbacks)).on_model_saved(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return TRLRunResult(out, trainer.state.global_step, metrics, time.perf_counter() - start)
