"""Reward models, end-to-end or with LoPT, on TRL's RewardTrainer.

A reward model is the policy's architecture with a one-score head (transformers' `...ForSequenceClassification`,
`num_labels=1`) in place of the LM head, trained with TRL's Bradley-Terry loss, -log sigmoid(score(chosen) -
score(rejected)), on preference pairs. With LoPT the final block and the score head learn from that loss, the earlier
blocks from their reconstruction losses, with local backward as in SFT (training/trl_integration.py). The result is a
plain `AutoModelForSequenceClassification` folder with its tokenizer and pad token, which `lopt grpo --reward_model`,
`lopt rloo` and TRL's reward-function path load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lopt.config import RMConfig
from lopt.data.presets import (
    preference_data_is_generated,
    preference_records,
    require_chat_template,
    source_options,
    with_validation,
)
from lopt.errors import LoptError
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

RECIPE = RECIPES["rm"]


def build_rm_trainer(config: RMConfig, out: Path, callbacks: Sequence[Callback] = ()):
    """The LoPT (or E2E) reward trainer for `config`, writing into `out`; `callbacks` listen next to metrics.jsonl."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    class LoptRewardTrainer(LoptTrainerMixin, RewardTrainer):
        pass

    if config.use_peft:
        raise LoptError(
            "--use_peft with lopt rm: the score head is new and must train in full beside the adapters, which lopt's "
            "adapter checkpoints do not hold yet; train the reward model without --use_peft (it is the size of the "
            "policy), or with --method lopt to cut its activation memory."
        )

    # before the model: a wrong --train_file, --eval_file or dataset fails without the load's wait
    def load(**overrides):
        return preference_records(config.dataset_preset, **{**source_options(config), **overrides})

    records, eval_records = with_validation(config, load, preference_data_is_generated(config))
    set_seed(config.seed)  # before the score head and the reconstruction heads are initialized
    args = trl_arguments(
        RewardConfig, config, max_length=config.max_seq_length,
        center_rewards_coefficient=config.center_rewards_coefficient, **validation_arguments(config, RECIPE.trl_keys()),
    )  # fmt: skip
    wrapper, tokenizer = build_model(config, args.device, reward_model=True)
    require_chat_template(records, tokenizer, config.model_name_or_path)
    trainer = build_lopt_trainer(
        LoptRewardTrainer, config, wrapper, args, **pair_datasets(records, eval_records), processing_class=tokenizer
    )
    add_lopt_callbacks(trainer, RECIPE, config.resume_from_checkpoint is not None, callbacks)
    return trainer


def run_rm(config: RMConfig, callbacks: Sequence[Callback] = ()) -> TRLRunResult:
    return run_trl_recipe(
        RECIPE,
        config,
        build_rm_trainer,
        lambda trainer: f"{plural(len(trainer.train_dataset), 'pair')} | one-score head, Bradley-Terry loss",
        callbacks,
    )
