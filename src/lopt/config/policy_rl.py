"""GRPO and RLOO's flags (TRL's GRPOTrainer and RLOOTrainer: completions sampled from the policy, a group per prompt,
rewarded by the task, your functions or a reward model) and the checks that need nothing but the flags.

What needs more is checked where it is known, by the recipe before the model loads (recipes/grpo.py): that
--reward_funcs import and --reward_weights fit them (the user's code), and `check_generation_batch` with the number
of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lopt.config.fields import option, reference_default
from lopt.config.schema import RunConfig
from lopt.config.validation import validates
from lopt.data.tasks import TASKS
from lopt.errors import LoptError


@dataclass
class PolicyRLConfig(RunConfig):
    """RL on completions sampled from the policy, a group per prompt (TRL's GRPOTrainer and RLOOTrainer): the
    prompts, the rewards (verifiable, your functions, a reward model) and the sampling flags they share."""

    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = RunConfig.AT_LEAST_ONE + (
        "num_generations",
        "max_prompt_length",
        "max_completion_length",
        "num_iterations",
    )

    BEST_MODEL_METRICS: ClassVar[dict[str, bool]] = {"eval_reward": True, "eval_task_loss": False}

    learning_rate: float = option(1e-6, "learning rate of the final block, final norm and LM head (all of E2E)")
    metric_for_best_model: str = option(
        "eval_reward",
        "validation metric that decides the best model: eval_reward (mean total reward of the completions sampled "
        "for the validation prompts, higher is better) or eval_task_loss (TRL's loss on them, lower is better)",
    )
    task: str = option(
        "gsm-symbolic",
        "gsm-symbolic, aiw, chain-sum (offline), gsm8k (openai/gsm8k), numinamath (AI-MO/NuminaMath-CoT)",
        choices=sorted(TASKS),
    )
    format_reward_weight: float = option(0.0, "weight of a reward for writing the answer in the task's format (0: off)")
    reward_funcs: str | None = option(
        None,
        "your own reward functions beside the task's, comma-separated: MODULE:FUNCTION (importable: installed or on "
        "PYTHONPATH) or PATH.py:FUNCTION; each def f(prompts, completions, **kwargs) -> list[float], the data's "
        "columns (answer, ...) in kwargs",
    )
    reward_model: str | None = option(
        None,
        "a reward model folder (`lopt rm` output, or any transformers sequence classifier with one label): its score "
        "of prompt + completion is a reward beside the others",
    )
    reward_weights: str | None = option(
        None,
        "comma-separated weights: the task's correctness reward's, then each --reward_funcs function's in order, then "
        "--reward_model's (default: 1 each; 0 logs a reward without training on it; the format reward's weight is "
        "--format_reward_weight)",
    )
    num_generations: int = option(4, "completions sampled per prompt (a group)")
    max_prompt_length: int = option(512, "prompts longer than this many tokens are skipped")
    max_completion_length: int = option(256, "tokens generated per completion at most")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling probability")
    beta: float = option(0.0, "KL coefficient against the frozen starting model (0: no reference model)")
    num_iterations: int = option(1, "optimization passes over each generated batch (mu)")
    steps_per_generation: int | None = option(
        None, "micro-batches per generation (default: --gradient_accumulation_steps)"
    )
    use_vllm: bool = option(False, "generate with vLLM (needs vllm installed and a GPU)")

    def check_own_flags(self) -> None:
        validate_policy_rl(self)


@dataclass
class GRPOConfig(PolicyRLConfig):
    """GRPO with TRL's GRPOTrainer; the sampling and loss flags are TRL's, passed through."""

    loss_type: str = option("dapo", "TRL's GRPO loss: grpo, dapo, dr_grpo, bnpo, ... (passed through)")


@dataclass
class RLOOConfig(PolicyRLConfig):
    """RLOO with TRL's RLOOTrainer: each completion's baseline is the mean reward of the others of its prompt, and the
    KL to the starting model (--beta) is part of the reward."""

    beta: float = option(0.05, "KL coefficient against the frozen starting model (RLOO's default 0.05; 0: none)")
    normalize_advantages: bool = option(False, "scale the advantages to unit standard deviation (TRL's)")


@dataclass
class ReferenceGRPOConfig(GRPOConfig):
    """`train_grpo.py`: `lopt grpo` with the LoPT reference implementation's defaults where lopt's differ."""

    lr_scheduler_type: str = reference_default(GRPOConfig, "lr_scheduler_type", "cosine")
    warmup_ratio: float = reference_default(GRPOConfig, "warmup_ratio", 0.03)
    select_samples: str = reference_default(GRPOConfig, "select_samples", "random")


def validate_policy_rl(config: PolicyRLConfig) -> None:
    if config.num_generations < 2:
        raise LoptError(
            "--num_generations must be at least 2 (GRPO and RLOO compare the completions of each prompt with each "
            f"other), got {config.num_generations}."
        )
    if config.steps_per_generation is not None and config.steps_per_generation < 1:
        raise LoptError(f"--steps_per_generation must be at least 1, got {config.steps_per_generation}.")


def check_generation_batch(config: PolicyRLConfig, processes: int) -> None:
    """That each prompt's group of --num_generations completions is sampled together, in training and validation,
    across `processes` processes (WORLD_SIZE, which the recipe reads)."""
    # TRL samples per_device_train_batch_size x steps_per_generation x processes completions at a time (its
    # generation_batch_size, which lopt sets through these flags) and needs whole groups of num_generations in it;
    # checked here, so that the error names the flags the user has.
    steps_flag = "steps_per_generation" if config.steps_per_generation is not None else "gradient_accumulation_steps"
    batch, steps, groups = config.per_device_train_batch_size, getattr(config, steps_flag), config.num_generations
    total = batch * steps * processes
    if total % groups:
        batch_unit = groups // math.gcd(groups, steps * processes)  # the batch sizes that work are its multiples
        smaller = batch // batch_unit * batch_unit
        batches = f"{smaller} or {smaller + batch_unit}" if smaller else f"{batch_unit}"
        steps_unit = groups // math.gcd(groups, batch * processes)
        divisors = [n for n in range(2, total + 1) if total % n == 0]
        closest = sorted(divisors, key=lambda n: abs(n - groups))[:2]
        generations = f", or --num_generations {' or '.join(map(str, sorted(closest)))}" if closest else ""
        raise LoptError(
            f"--num_generations {groups} does not divide the {total} completions sampled at a time "
            f"(--per_device_train_batch_size {batch} x --{steps_flag} {steps} x {processes} "
            f"process{'es' if processes > 1 else ''}); each prompt's {groups} completions must be sampled together. "
            f"Use --per_device_train_batch_size {batches}, --{steps_flag} {-(-steps // steps_unit) * steps_unit}"
            f"{generations}."
        )
    if validates(config) and config.per_device_eval_batch_size * processes % groups:
        # TRL samples num_generations completions for each validation prompt too, within one validation batch
        unit = groups // math.gcd(groups, processes)
        raise LoptError(
            f"--num_generations {groups} does not divide the {config.per_device_eval_batch_size * processes} "
            f"completions validated at a time (--per_device_eval_batch_size {config.per_device_eval_batch_size} x "
            f"{processes} process{'es' if processes > 1 else ''}); use --per_device_eval_batch_size "
            f"{-(-config.per_device_eval_batch_size // unit) * unit}."
        )
