"""The recipe registry: one record per recipe, everything lopt knows about it in one place.

A record names the recipe's command (`lopt <name>`), its config class (flags, YAML keys, validation), its run
function (imported only when the command runs, so `lopt --help` imports no torch), the columns it adds to the
metrics contract (training/metrics.py) with the TRL log keys they come from, what its task loss is, the column that
says how training went, what it trains on and what it makes. The CLI, `watch`, the dashboard, `report`, `push` and
`data preview` read these records; none of them branches on a recipe's name. Adding a recipe is its module, its
config class and one record here (docs/architecture.md walks through one).

training_args.json records the name of the recipe that made a run (lopt.runs); `RECIPES[name]` is its record.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from lopt.config import (
    DPOConfig,
    GRPOConfig,
    ReferenceGRPOConfig,
    ReferenceSFTConfig,
    RLOOConfig,
    RMConfig,
    RunConfig,
    SFTConfig,
)
from lopt.config.preference import KTOConfig
from lopt.output import plural


@dataclass(frozen=True)
class Column:
    """One of a recipe's metrics.jsonl columns: what it holds, and the key of TRL's logs it comes from (TRL recipes;
    a validation column's key is TRL's eval_ key of its training column's)."""

    meaning: str
    trl_key: str | None = None


@dataclass(frozen=True)
class Headline:
    """The recipe's own column that says how training went, as reports show it: column, label, format spec."""

    column: str
    label: str
    spec: str


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"  # None: a resumed run had no step left


@dataclass(frozen=True)
class FirstToLast:
    """The end-of-run line's result part: the task loss of the first and the last step, under `label`."""

    label: str

    def __call__(self, result) -> str:
        return f"{self.label} {_loss(result.first_loss)} -> {_loss(result.last_loss)}"


@dataclass(frozen=True)
class PerLoggedStep:
    """The end-of-run line's result part: a column's value at every logged step."""

    column: str
    label: str
    spec: str

    def __call__(self, result) -> str:
        return f"{self.label} per logged step " + " -> ".join(format(m[self.column], self.spec) for m in result.metrics)


@dataclass(frozen=True)
class Recipe:
    name: str  # the command, `lopt <name>`, and training_args.json's "recipe"
    summary: str  # what it trains, one line: `lopt --help` and the model card
    description: str  # `lopt <name> --help`'s description, without its final period
    config: type[RunConfig]
    run: str  # "module:function": run(config, callbacks=[...]) -> a result with steps, elapsed_s, output_dir
    loss: str  # what its task_loss column holds (reports title its plots with it)
    # what it trains on: examples (SFT records), prompts (completions sampled from the policy and scored), pairs
    # (preference data); the dashboard's panel and the model card's data line follow it
    data: Literal["examples", "prompts", "pairs"]
    result: Callable  # the end-of-run line's result part, from the run's result
    columns: dict[str, Column] = field(default_factory=dict)  # its own metrics.jsonl columns, in file order
    eval_columns: dict[str, Column] = field(default_factory=dict)  # their validation counterparts, after them
    headline: Headline | None = None
    scores: bool = False  # it makes a reward model (one score per text), not a text generator
    preview: str | None = None  # "module:function" of `lopt data preview --recipe <name>`, where it has one
    # the LoPT reference implementation's script for this recipe, and the config with the reference's defaults
    reference_script: str | None = None
    reference_config: type[RunConfig] | None = None

    def load_run(self) -> Callable:
        """The run function, imported now (torch, transformers and TRL with it)."""
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)

    @property
    def made(self) -> str:
        return "reward model" if self.scores else "model"

    def end_line(self, result) -> str:
        return (
            f"done: {plural(result.steps, 'step')} in {result.elapsed_s:.1f} s, {self.result(result)}; {self.made} "
            f"saved to {result.output_dir}"
        )

    def trl_keys(self) -> dict[str, str]:
        """Its training columns and the TRL log keys they come from."""
        return {name: column.trl_key for name, column in self.columns.items()}


# GRPO's and RLOO's columns and validation columns: TRL logs the same keys for both.
SAMPLED_COLUMNS = {
    "reward": Column("mean total reward of the step's completions (weighted sum of the reward functions)", "reward"),
    "reward_std": Column("standard deviation of the total reward within a prompt's group, averaged", "reward_std"),
    "completion_length": Column("mean completion length in tokens", "completions/mean_length"),
    "step_time_s": Column("seconds TRL measured for the step", "step_time"),
}
SAMPLED_EVAL_COLUMNS = {
    "eval_reward": Column("mean total reward of the completions sampled for the validation prompts"),
    "eval_reward_std": Column("reward_std over the validation prompts' groups"),
    "eval_completion_length": Column("mean length in tokens of the validation completions"),
}
REWARD_HEADLINE = Headline("reward", "reward", ".3f")
MEAN_REWARD = PerLoggedStep("reward", "mean reward", ".3f")
ACCURACY_HEADLINE = Headline("reward_accuracy", "reward accuracy", ".1%")


def _validated(columns: dict[str, Column], over: str) -> dict[str, Column]:
    """Each column's validation counterpart: eval_<name>, the same measure over `over`."""
    return {f"eval_{name}": Column(f"{name} over {over}") for name in columns}


DPO_COLUMNS = {
    "reward_accuracy": Column(
        "fraction of pairs whose implicit reward ranks chosen above rejected", "rewards/accuracies"
    ),
    "reward_margin": Column("mean implicit reward of chosen minus rejected", "rewards/margins"),
    "reward_chosen": Column("mean implicit reward of the chosen answers", "rewards/chosen"),
    "reward_rejected": Column("mean implicit reward of the rejected answers", "rewards/rejected"),
}
KTO_COLUMNS = {
    "reward_chosen": Column("mean implicit reward of the desirable answers", "rewards/chosen"),
    "reward_rejected": Column("mean implicit reward of the undesirable answers", "rewards/rejected"),
    "reward_margin": Column("reward_chosen minus reward_rejected", "rewards/margins"),
    "kl": Column("KTO's estimate of KL(policy || reference), the reference point of its loss", "kl"),
}
RM_COLUMNS = {
    "reward_accuracy": Column("fraction of pairs the reward model scores chosen above rejected", "accuracy"),
    "reward_margin": Column("mean score of chosen minus rejected", "margin"),
    "reward_mean": Column("mean score over the chosen and rejected answers", "mean_reward"),
}

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="sft",
            summary="supervised fine-tuning",
            description="Supervised fine-tuning (E2E or LoPT)",
            config=SFTConfig,
            run="lopt.recipes.sft:run_sft",
            loss="SFT: cross entropy per trained token",
            data="examples",
            result=FirstToLast("task loss"),
            columns={
                "kl": Column(
                    "mean KL(model || starting model) per trained token, the term --kl_beta weighs (null when it is 0)"
                )
            },
            preview="lopt.tools.preview:preview_sft",
            reference_script="train_sft.py",
            reference_config=ReferenceSFTConfig,
        ),
        Recipe(
            name="grpo",
            summary="GRPO (TRL's GRPOTrainer) on the rewards of sampled completions",
            description="GRPO (E2E or LoPT) on verifiable rewards or a reward model",
            config=GRPOConfig,
            run="lopt.recipes.grpo:run_grpo",
            loss="GRPO: TRL's policy loss",
            data="prompts",
            result=MEAN_REWARD,
            columns=SAMPLED_COLUMNS,
            eval_columns=SAMPLED_EVAL_COLUMNS,
            headline=REWARD_HEADLINE,
            preview="lopt.tools.preview:preview_grpo",
            reference_script="train_grpo.py",
            reference_config=ReferenceGRPOConfig,
        ),
        Recipe(
            name="rloo",
            summary="RLOO (TRL's RLOOTrainer) on the rewards of sampled completions",
            description="RLOO (E2E or LoPT) on verifiable rewards or a reward model",
            config=RLOOConfig,
            run="lopt.recipes.grpo:run_grpo",
            loss="RLOO: TRL's policy loss",
            data="prompts",
            result=MEAN_REWARD,
            columns=SAMPLED_COLUMNS,
            eval_columns=SAMPLED_EVAL_COLUMNS,
            headline=REWARD_HEADLINE,
        ),
        Recipe(
            name="dpo",
            summary="DPO (TRL's DPOTrainer) on preference pairs",
            description="DPO on preference pairs (E2E or LoPT)",
            config=DPOConfig,
            run="lopt.recipes.dpo:run_dpo",
            loss="DPO: TRL's preference loss",
            data="pairs",
            result=FirstToLast("DPO loss"),
            columns=DPO_COLUMNS,
            eval_columns=_validated(DPO_COLUMNS, "the validation pairs"),
            headline=ACCURACY_HEADLINE,
            preview="lopt.tools.preview:preview_dpo",
        ),
        Recipe(
            name="rm",
            summary=(
                "a reward model (TRL's RewardTrainer): one score per answer, Bradley-Terry loss on preference pairs"
            ),
            description="A reward model on preference pairs (E2E or LoPT): one score per answer, Bradley-Terry loss",
            config=RMConfig,
            run="lopt.recipes.rm:run_rm",
            loss="reward model: pairwise Bradley-Terry loss",
            data="pairs",
            result=PerLoggedStep("reward_accuracy", "pairwise accuracy", ".2f"),
            columns=RM_COLUMNS,
            eval_columns=_validated(RM_COLUMNS, "the validation pairs"),
            headline=ACCURACY_HEADLINE,
            scores=True,
        ),
        Recipe(
            name="kto",
            summary="KTO (TRL's KTOTrainer) on the answers of preference pairs, unpaired",
            description="KTO on the answers of preference pairs, each desirable or undesirable (E2E or LoPT)",
            config=KTOConfig,
            run="lopt.recipes.kto:run_kto",
            loss="KTO: TRL's loss on desirable and undesirable answers",
            data="pairs",
            result=FirstToLast("KTO loss"),
            columns=KTO_COLUMNS,
            eval_columns=_validated(KTO_COLUMNS, "the validation answers"),
            headline=Headline("reward_margin", "reward margin", ".3f"),
        ),
    )
}


def recipe_record(name: str | None) -> Recipe | None:
    """The record of the recipe `name` (a run folder's training_args.json names it); None for a folder without one
    (a starting model) or a recipe this lopt does not know (a run made by a newer one)."""
    return RECIPES.get(name) if name else None
