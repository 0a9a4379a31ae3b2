"""The TRL recipes trained on preference data, declared as data: DPO, reward models, KTO.

They share one shape: the preference records of --dataset_preset / --train_file / --dataset_name (with their
validation records), the seed, TRL's config from lopt's flags plus the recipe's own, the model (a reward model for
recipes that make one), a check that conversations have a chat template, TRL's trainer with `LoptTrainerMixin`, and
lopt's listeners. A `PreferenceRecipe` names what differs: the TRL trainer and config classes, the recipe's own TRL
arguments, how its datasets are made from the records, and its part of the start-up line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lopt.config import PreferenceConfig
from lopt.data.presets import (
    preference_data_is_generated,
    preference_records,
    require_chat_template,
    source_options,
    with_validation,
)
from lopt.recipes.registry import RECIPES
from lopt.recipes.trl.arguments import trl_arguments, validation_arguments
from lopt.recipes.trl.bridge import add_lopt_callbacks
from lopt.recipes.trl.mixin import LoptTrainerMixin
from lopt.recipes.trl.runner import TRLRunResult, build_lopt_trainer, pair_datasets, run_trl_recipe
from lopt.training.callbacks import Callback
from lopt.training.run import build_model


def _trl_class(name: str) -> type:
    """A class of TRL's, by its name in the `trl` package (imported when a run builds its trainer)."""
    return getattr(importlib.import_module("trl"), name)


@dataclass(frozen=True)
class PreferenceRecipe:
    name: str  # the recipe's record in recipes/registry.py
    trainer: str  # TRL's trainer class, by name: DPOTrainer, ...
    trl_config: str  # TRL's config class, by name: DPOConfig, ...
    arguments: Callable[[PreferenceConfig], dict]  # the recipe's own fields of TRL's config, from its flags
    describe: Callable[[PreferenceConfig, object], str]  # its part of the start-up line, from the config and trainer
    datasets: Callable[[list[dict], list[dict] | None], dict] = pair_datasets  # train_dataset / eval_dataset

    def build_trainer(self, config: PreferenceConfig, out: Path, callbacks: Sequence[Callback] = ()):
        """The LoPT (or E2E) trainer for `config`, writing into `out`; `callbacks` listen next to metrics.jsonl."""
        from transformers import set_seed

        recipe = RECIPES[self.name]
        trainer_class = type(f"Lopt{self.trainer}", (LoptTrainerMixin, _trl_class(self.trainer)), {})

        # before the model: a wrong --train_file, --eval_file or dataset fails without the load's wait
        def load(**overrides):
            return preference_records(config.dataset_preset, **{**source_options(config), **overrides})

        records, eval_records = with_validation(config, load, preference_data_is_generated(config))
        set_seed(config.seed)  # before the heads (and a reward model's score head) are initialized
        args = trl_arguments(
            _trl_class(self.trl_config), config, **self.arguments(config),
            **validation_arguments(config, recipe.trl_keys()),
        )  # fmt: skip
        # accelerate's device: this process's GPU, else CPU
        wrapper, tokenizer = build_model(config, args.device, reward_model=recipe.scores)
        require_chat_template(records, tokenizer, config.model_name_or_path)
        trainer = build_lopt_trainer(
            trainer_class, config, wrapper, args, **self.datasets(records, eval_records), processing_class=tokenizer
        )
        add_lopt_callbacks(trainer, recipe, config.resume_from_checkpoint is not None, callbacks)
        return trainer

    def run(self, config: PreferenceConfig, callbacks: Sequence[Callback] = ()) -> TRLRunResult:
        return run_trl_recipe(
            RECIPES[self.name], config, self.build_trainer, lambda trainer: self.describe(config, trainer), callbacks
        )
