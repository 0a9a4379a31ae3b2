"""GRPO and RLOO, end-to-end or with LoPT, on TRL's GRPOTrainer and RLOOTrainer (a group of completions sampled from
the current policy for each prompt, each scored against the others of its group).

How LoPT enters TRL is in recipes/trl/; this module adds what the two share: the prompts with a
verifiable answer, the rewards (the task's, your functions, a reward model from `lopt rm`), and `completions.jsonl`
(sample completions with each reward's score, for the dashboard). They differ in TRL's trainer and its loss only:
GRPO's clipped, group-normalized objective (--loss_type), RLOO's leave-one-out baseline with the KL in the reward.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from lopt.config import PolicyRLConfig, RLOOConfig
from lopt.config.policy_rl import check_generation_batch
from lopt.data.collate import build_prompt
from lopt.data.presets import grpo_records, source_options, with_validation
from lopt.data.tasks import get_task
from lopt.errors import LoptError
from lopt.models.reward_model import load_reward_model, tokenizer_note
from lopt.output import console
from lopt.recipes.registry import RECIPES
from lopt.recipes.trl.arguments import trl_arguments, validation_arguments
from lopt.recipes.trl.bridge import add_lopt_callbacks
from lopt.recipes.trl.mixin import LoptTrainerMixin
from lopt.recipes.trl.runner import TRLRunResult, build_lopt_trainer, run_trl_recipe
from lopt.rewards import check_reward_arguments, completion_text
from lopt.tasks import grpo_rewards
from lopt.training.callbacks import Callback
from lopt.training.run import build_model, weights_dtype

logger = logging.getLogger(__name__)


class _EpochSeededSampler:
    """TRL's RepeatSampler with each epoch's prompt order seeded by (seed, epoch), not drawn on from one generator.

    TRL's sampler shuffles every epoch with the generator it seeded once, so the order of epoch e depends on how many
    epochs it has shuffled before; a run resumed after an epoch has shuffled none, and its later epochs took other
    prompts than the uninterrupted run's. The Trainer calls `set_epoch` at each epoch (a resumed run too), so
    reseeding there makes every epoch's order the same however the run got there. Epoch 0's is TRL's own.
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        if self.sampler.seed is not None:
            self.sampler.generator.manual_seed(self.sampler.seed + epoch)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _trainer_and_config(config: PolicyRLConfig):
    """TRL's trainer class, with LoPT and completions.jsonl, and TRL's config class for `config`'s algorithm."""
    import trl  # imported here: TRL takes seconds to import

    base, trl_config = (
        (trl.RLOOTrainer, trl.RLOOConfig) if isinstance(config, RLOOConfig) else (trl.GRPOTrainer, trl.GRPOConfig)
    )

    class LoptPolicyTrainer(LoptTrainerMixin, base):
        """TRL's trainer with LoPT (recipes/trl/) that also writes each scored completion to a file."""

        completions_path: Path | None = None

        def _get_train_sampler(self, dataset=None):
            return _EpochSeededSampler(super()._get_train_sampler(dataset))

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            # the training completions only: validation samples its own, which no step trains on
            if self.completions_path is not None and self.accelerator.is_main_process and self.model.training:
                # the rewards are gathered over processes; this process's rows come at its offset
                mine = rewards[self.accelerator.process_index * len(prompts) :][: len(prompts)].tolist()
                weights = self.reward_weights.tolist()
                with self.completions_path.open("a") as fh:
                    for prompt, completion, row in zip(prompts, completions, mine, strict=True):
                        # a reward function returns None where it does not apply: TRL makes it NaN and leaves
                        # it out of the weighted sum; JSON has no NaN, so it is written as null
                        scores = [None if math.isnan(r) else r for r in row]
                        fh.write(
                            json.dumps(
                                {
                                    "step": self.state.global_step + 1,  # the first step that trains on them
                                    "prompt": completion_text(prompt),
                                    "completion": completion_text(completion),
                                    "rewards": dict(zip(self.reward_func_names, scores, strict=True)),
                                    "reward": sum(w * r for w, r in zip(weights, scores, strict=True) if r is not None),
                                }
                            )
                            + "\n"
                        )
            return rewards

    return LoptPolicyTrainer, trl_config


def _prompt_length(tokenizer, prompt) -> int:
    text = prompt if isinstance(prompt, str) else build_prompt(tokenizer, prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare_prompts(records: list[dict], tokenizer, max_prompt_length: int) -> list[dict]:
    """Drop prompts longer than `max_prompt_length` tokens (a cut question cannot be answered), and
    render them as text when the tokenizer has no chat template (TRL renders conversations itself)."""
    lengths = [_prompt_length(tokenizer, r["prompt"]) for r in records]
    kept = [r for r, length in zip(records, lengths, strict=True) if length <= max_prompt_length]
    longest = max(lengths)
    keep_all = (
        f"Pass --max_prompt_length {longest} to keep them all (lopt skips a long prompt rather than cut it: a cut "
        "question cannot be answered)."
    )
    # counted as the model sees them: the chat template's system prompt can be most of a short question
    if not kept:
        raise LoptError(
            f"all {len(records)} prompts are longer than --max_prompt_length {max_prompt_length} tokens (prompt "
            f"template included): the shortest has {min(lengths)}, the longest {longest}. {keep_all}"
        )
    if len(kept) < len(records):
        logger.warning(
            "--max_prompt_length %d skipped %d of %d prompts: they are longer than %d tokens (prompt template "
            "included), the longest %d. %s",
            max_prompt_length, len(records) - len(kept), len(records), max_prompt_length, longest, keep_all,
        )  # fmt: skip
    if not tokenizer.chat_template:
        kept = [{**r, "prompt": build_prompt(tokenizer, r["prompt"])} for r in kept]
    return kept


def _recipe(config: PolicyRLConfig):
    """The registry record of the recipe `config` is for: RLOO for an RLOOConfig, else GRPO."""
    return RECIPES["rloo" if isinstance(config, RLOOConfig) else "grpo"]


def build_grpo_trainer(config: PolicyRLConfig, out: Path, callbacks: Sequence[Callback] = (), **trl_settings):
    """The LoPT (or E2E) GRPO or RLOO trainer for `config` (a GRPOConfig or RLOOConfig), writing into `out`;
    `callbacks` listen next to metrics.jsonl; `trl_settings` are extra fields of TRL's config (tests use them, e.g. for
    greedy generation)."""
    import datasets
    from accelerate import PartialState
    from transformers import set_seed

    trainer_class, trl_config = _trainer_and_config(config)
    reward_model = reward_tokenizer = None
    if config.reward_model:  # before the policy: a folder that is no reward model fails without the policy's load
        device = PartialState().device  # the device TRL's arguments will name: this process's GPU, else CPU
        reward_model, reward_tokenizer = load_reward_model(config.reward_model, weights_dtype(config, device), device)
    set_seed(config.seed)  # before the heads are initialized
    rewards = grpo_rewards(config, reward_model)
    specific = (
        {"normalize_advantages": config.normalize_advantages}
        if isinstance(config, RLOOConfig)
        else {"loss_type": config.loss_type}
    )
    args = trl_arguments(
        trl_config,
        config,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        beta=config.beta,
        num_iterations=config.num_iterations,
        steps_per_generation=config.steps_per_generation,
        use_vllm=config.use_vllm,
        reward_weights=[reward.weight for reward in rewards],
        **specific,
        **validation_arguments(config, _recipe(config).trl_keys()),
        **trl_settings,
    )

    def load(**overrides):
        return grpo_records(config.task, **{**source_options(config), **overrides})

    generated = not (config.train_file or config.dataset_name) and get_task(config.task).hub_id is None
    records, eval_records = with_validation(config, load, generated)
    # before the model loads: a reward function TRL could not call would fail only at the first step
    functions = {reward.source: reward.func for reward in rewards if reward.func is not reward_model}
    check_reward_arguments(functions, [c for c in records[0] if c != "prompt"])
    wrapper, tokenizer = build_model(config, args.device)  # accelerate's device: this process's GPU, else CPU
    if reward_model is not None:
        note = tokenizer_note(reward_tokenizer, tokenizer, conversations=bool(tokenizer.chat_template))
        if note:
            console.print(f"lopt: {note}")
    dataset = datasets.Dataset.from_list(prepare_prompts(records, tokenizer, config.max_prompt_length))
    eval_dataset = None
    if eval_records is not None:  # the validation prompts go through the same length filter and rendering
        eval_dataset = datasets.Dataset.from_list(prepare_prompts(eval_records, tokenizer, config.max_prompt_length))
    trainer = build_lopt_trainer(
        trainer_class, config, wrapper, args, train_dataset=dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, reward_funcs=[reward.func for reward in rewards],
        # a reward model scores with its own tokenizer (TRL re-tokenizes the texts); functions need none
        reward_processing_classes=[reward_tokenizer if r.func is reward_model else None for r in rewards],
    )  # fmt: skip
    resuming = config.resume_from_checkpoint is not None  # a resumed run appends to its files
    trainer.completions_path = out / "completions.jsonl"
    if trainer.accelerator.is_main_process and not resuming:
        trainer.completions_path.write_text("")
    add_lopt_callbacks(trainer, _recipe(config), resuming, callbacks)
    return trainer


def check_before_loading(config: PolicyRLConfig) -> None:
    """What the flags alone cannot tell, checked before anything loads: the generation batches across this launch's
    processes, and the rewards (--reward_funcs import, --reward_weights one per function)."""
    check_generation_batch(config, int(os.environ.get("WORLD_SIZE", "1")))  # set by torchrun and accelerate launch
    grpo_rewards(config)  # imports the user's reward modules


def run_grpo(config: PolicyRLConfig, callbacks: Sequence[Callback] = ()) -> TRLRunResult:
    """A GRPO run, or an RLOO run for an RLOOConfig."""
    check_before_loading(config)
    return run_trl_recipe(
        _recipe(config),
        config,
        build_grpo_trainer,
        lambda trainer: (
            f"task {config.task} ({get_task(config.task).description}), {len(trainer.train_dataset)} "
            f"prompts | {config.num_generations} completions per prompt | rewards "
            + ", ".join(
                f"{name} x{weight:g}"
                for name, weight in zip(trainer.reward_func_names, trainer.reward_weights.tolist(), strict=True)
            )
        ),
        callbacks,
    )
