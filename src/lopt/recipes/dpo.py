"""DPO, end-to-end or with LoPT, on TRL's DPOTrainer.

How LoPT enters TRL is in recipes/trl/; the shape DPO shares with the other preference recipes in
recipes/trl/preference.py. The reference model is the frozen starting model: TRL loads
it again from the policy's own folder (the policy's config names it), so it carries none of the
LoPT hooks and runs without gradients.
"""

from __future__ import annotations

from lopt.output import plural
from lopt.recipes.trl.preference import PreferenceRecipe

DPO = PreferenceRecipe(
    name="dpo",
    trainer="DPOTrainer",
    trl_config="DPOConfig",
    arguments=lambda config: dict(beta=config.beta, loss_type=config.loss_type, max_length=config.max_seq_length),
    describe=lambda config, trainer: (
        f"{plural(len(trainer.train_dataset), 'pair')} | beta {config.beta}, loss {config.loss_type}"
    ),
)
build_dpo_trainer = DPO.build_trainer
run_dpo = DPO.run
