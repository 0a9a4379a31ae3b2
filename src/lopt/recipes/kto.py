"""KTO, end-to-end or with LoPT, on TRL's KTOTrainer.

KTO (Kahneman-Tversky Optimization) learns from unpaired answers, each marked desirable or undesirable, instead of
pairs: here the answers of the preference data, unpaired by TRL's `unpair_preference_dataset` (a pair's chosen answer
is a desirable example, its rejected one an undesirable example). As in DPO the reference model is the frozen starting
model; with LoPT the final block learns from KTO's loss and the earlier blocks from their reconstruction losses.
Everything else is the shape the preference recipes share (recipes/trl/preference.py).
"""

from __future__ import annotations

from lopt.output import plural
from lopt.recipes.trl.preference import PreferenceRecipe


def unpaired_datasets(records: list[dict], eval_records: list[dict] | None) -> dict:
    """The train_dataset / eval_dataset of KTOTrainer: each pair's two answers as two labelled examples."""
    import datasets
    from trl import unpair_preference_dataset

    def unpaired(rows: list[dict]):
        return unpair_preference_dataset(datasets.Dataset.from_list(rows))

    return {
        "train_dataset": unpaired(records),
        "eval_dataset": unpaired(eval_records) if eval_records is not None else None,
    }


KTO = PreferenceRecipe(
    name="kto",
    trainer="KTOTrainer",
    trl_config="KTOConfig",
    arguments=lambda config: dict(
        beta=config.beta,
        loss_type=config.loss_type,
        desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight,
        max_length=config.max_seq_length,
    ),  # fmt: skip
    describe=lambda config, trainer: (
        f"{plural(len(trainer.train_dataset), 'unpaired answer')} | beta {config.beta}, loss {config.loss_type}, "
        f"weights {config.desirable_weight:g} desirable / {config.undesirable_weight:g} undesirable"
    ),
    datasets=unpaired_datasets,
)
build_kto_trainer = KTO.build_trainer
run_kto = KTO.run
