"""DPO, end-to-end or with LoPT, on TRL's DPOTrainer.

How LoPT enters TRL is in training/trl_integration.py. The reference model is the frozen starting model: TRL loads
it again from the policy's own folder (the policy's config names it), so it carries none of the
LoPT hooks and runs without gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from lopt.config import DPOConfig
from lopt.data.presets import dpo_records, source_options, with_validation
from lopt.errors import LoptError
from lopt.output import plural
from lopt.training.callbacks import Callback
from lopt.training.run import build_model
from lopt.training.trl_integration import (
    LoptTrainerMixin,
    TRLRunResult,
    add_lopt_callbacks,
    run_trl_recipe,
    trl_arguments,
    validation_arguments,
)

# metrics.jsonl columns that DPO adds to the contract (training/metrics.py), and the TRL log keys they come from
DPO_METRICS = {
    "reward_accuracy": "rewards/accuracies",
    "reward_margin": "rewards/margins",
    "reward_chosen": "rewards/chosen",
    "reward_rejected": "rewards/rejected",
}


def _is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def build_dpo_trainer(config: DPOConfig, out: Path, callbacks: Sequence[Callback] = ()):
    """The LoPT (or E2E) DPO trainer for `config`, writing into `out`; `callbacks` listen next to metrics.jsonl."""
    import datasets
    from transformers import set_seed
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    class LoptDPOTrainer(LoptTrainerMixin, DPOTrainer):
        pass

    # before the model: a wrong --train_file, --eval_file or dataset fails without the load's wait
    def load(**overrides):
        return dpo_records(config.dataset_preset, **{**source_options(config), **overrides})

    # the presets are generated offline: only a --train_file or --dataset_name has other splits
    records, eval_records = with_validation(config, load, generated=not (config.train_file or config.dataset_name))
    set_seed(config.seed)  # before the heads are initialized
    args = trl_arguments(
        TRLDPOConfig, config, beta=config.beta, loss_type=config.loss_type, max_length=config.max_seq_length,
        **validation_arguments(config, DPO_METRICS),
    )  # fmt: skip
    wrapper, tokenizer = build_model(config, args.device)  # accelerate's device: this process's GPU, else CPU
    if _is_conversation(records[0]["chosen"]) and not tokenizer.chat_template:
        raise LoptError(
            f"the DPO data is in chat format but the tokenizer of {config.model_name_or_path} has no chat template; "
            "use a chat model or text prompt/chosen/rejected records (--train_file)."
        )
    try:
        trainer = LoptDPOTrainer(
            model=wrapper.model,
            args=args,
            train_dataset=datasets.Dataset.from_list(records),
            eval_dataset=datasets.Dataset.from_list(eval_records) if eval_records is not None else None,
            processing_class=tokenizer,
            lopt=wrapper,
            backward=config.backward,
            lr_k1=config.lr_k1,
            save_total_limit=config.save_total_limit,
        )
    except (ValueError, ImportError) as error:  # TRL's checks of the settings and the data
        raise LoptError(f"TRL's DPOTrainer rejected these settings or data: {error}") from error
    for data, what in ((trainer.train_dataset, "train on"), (trainer.eval_dataset, "validate on")):
        if data is not None and len(data) == 0:  # TRL drops pairs whose prompt alone fills max_length
            raise LoptError(
                f"every prompt is at least --max_seq_length {config.max_seq_length} tokens long, so no answer token "
                f"is left to {what}; raise --max_seq_length."
            )
    add_lopt_callbacks(trainer, "dpo", DPO_METRICS, config.resume_from_checkpoint is not None, callbacks)
    return trainer


def run_dpo(config: DPOConfig, callbacks: Sequence[Callback] = ()) -> TRLRunResult:
    return run_trl_recipe(
        "dpo",
        config,
        functools.partial(build_dpo_trainer, callbacks=callbacks),
        lambda trainer: f"{plural(len(trainer.train_dataset), 'pair')} | beta {config.beta}, loss {config.loss_type}",
    )
