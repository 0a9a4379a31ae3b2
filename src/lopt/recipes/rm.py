"""Reward models, end-to-end or with LoPT, on TRL's RewardTrainer.

A reward model is the policy's architecture with a one-score head (transformers' `...ForSequenceClassification`,
`num_labels=1`) in place of the LM head, trained with TRL's Bradley-Terry loss, -log sigmoid(score(chosen) -
score(rejected)), on preference pairs. With LoPT the final block and the score head learn from that loss, the earlier
blocks from their reconstruction losses, with local backward as in SFT (recipes/trl/). The result is a
plain `AutoModelForSequenceClassification` folder with its tokenizer and pad token, which `lopt grpo --reward_model`,
`lopt rloo` and TRL's reward-function path load as they are.
"""

from __future__ import annotations

from lopt.output import plural
from lopt.recipes.trl.preference import PreferenceRecipe

RM = PreferenceRecipe(
    name="rm",
    trainer="RewardTrainer",
    trl_config="RewardConfig",
    arguments=lambda config: dict(
        max_length=config.max_seq_length, center_rewards_coefficient=config.center_rewards_coefficient
    ),
    describe=lambda config, trainer: (
        f"{plural(len(trainer.train_dataset), 'pair')} | one-score head, Bradley-Terry loss"
    ),
)
build_rm_trainer = RM.build_trainer
run_rm = RM.run
