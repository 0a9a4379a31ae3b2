"""DPO, end-to-end or with LoPT, on TRL's DPOTrainer.

How LoPT enters TRL is in training/trl_integration.py. The reference model is the frozen starting model: TRL loads
it again from the policy's own folder (the policy's config names it), so it carries none of the
LoPT hooks and runs without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lopt.config import DPOConfig
from lopt.data.presets import (
    preference_data_is_generated,
    preference_records,
    require_chat_template,
    source_options,
    with_validation,
)
from lopt.output import plural
from lopt.recipes.registry import RECIPES
from lopt.training.callbacks import Callback
from lopt.training.run import build_model
from lopt.training.trl_integration import (
    LoptTrainerMixin,
    TRLRunResult,
    add_lopt_callbacks,
    build_lopt_trainer,
    pair_datasets,
    run_trl_recipe,
    trl_arguments,
    validation_arguments,
)

RECIPE = RECIPES["dpo"]


def build_dpo_trainer(config: DPOConfig, out: Path, callbacks: Sequence[Callback] = ()):
    """The LoPT (or E2E) DPO trainer for `config`, writing into `out`; `callbacks` listen next to metrics.jsonl."""
    from transformers import set_seed
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    class LoptDPOTrainer(LoptTrainerMixin, DPOTrainer):
        pass

    # before the model: a wrong --train_file, --eval_file or dataset fails without the load's wait
    def load(**overrides):
        return preference_records(config.dataset_preset, **{**source_options(config), **overrides})

    records, eval_records = with_validation(config, load, preference_data_is_generated(config))
    set_seed(config.seed)  # before the heads are initialized
    args = trl_arguments(
        TRLDPOConfig, config, beta=config.beta, loss_type=config.loss_type, max_length=config.max_seq_length,
        **validation_arguments(config, RECIPE.trl_keys()),
    )  # fmt: skip
    wrapper, tokenizer = build_model(config, args.device)  # accelerate's device: this process's GPU, else CPU
    require_chat_template(records, tokenizer, config.model_name_or_path)
    trainer = build_lopt_trainer(
        LoptDPOTrainer, config, wrapper, args, **pair_datasets(records, eval_records), processing_class=tokenizer
    )
    add_lopt_callbacks(trainer, RECIPE, config.resume_from_checkpoint is not None, callbacks)
    return trainer


def run_dpo(config: DPOConfig, callbacks: Sequence[Callback] = ()) -> TRLRunResult:
    return run_trl_recipe(
        RECIPE,
        config,
        build_dpo_trainer,
        lambda trainer: f"{plural(len(trainer.train_dataset), 'pair')} | beta {config.beta}, loss {config.loss_type}",
        callbacks,
    )
