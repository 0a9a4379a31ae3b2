"""The rewards a GRPO or RLOO run trains on (`grpo_rewards`): the task's correctness reward, the user's
--reward_funcs, a reward model, the format reward, with their weights.

The tasks themselves (source, answer style, reward, held-out problems) are registered in lopt/data/tasks.py, beside
the data that reads them; TASKS and EVALUABLE_TASKS are re-exported here for the tools that import them from here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from lopt.data.tasks import EVALUABLE_TASKS, TASKS, get_task
from lopt.errors import LoptError
from lopt.rewards import (
    RewardFunc,
    format_reward,
    load_reward_func,
    reward_model_name,
    reward_name,
    split_list,
)

__all__ = ["EVALUABLE_TASKS", "TASKS", "Reward", "grpo_rewards"]


class Reward(NamedTuple):
    func: RewardFunc
    weight: float
    source: str  # the flag that adds it, for messages: --task NAME, --format_reward_weight, --reward_funcs SPEC


def grpo_rewards(config, reward_model=None) -> list[Reward]:
    """A run's reward functions, in the order TRL gets them, with their weights.

    The task's correctness reward, then each of --reward_funcs, then --reward_model's (`reward_model`, loaded; before
    it is, as in the flags' checks, the entry holds None), weighted by --reward_weights (one weight each, in that
    order; 1 each without it); and the format reward, weighted by --format_reward_weight, when that is not 0. Each
    function's scores go under its name (TRL's metrics rewards/<name>/mean, completions.jsonl), so names must differ.
    """
    task = get_task(config.task)
    weighted = [(task.reward, f"--task {config.task}")] + [
        (load_reward_func(spec), f"--reward_funcs {spec}") for spec in split_list(config.reward_funcs)
    ]
    if getattr(config, "reward_model", None):
        weighted.append((reward_model, f"--reward_model {config.reward_model}"))
    names = [
        (reward_name(func) if func is not None else reward_model_name(config.reward_model), source)
        for func, source in weighted
    ]
    weights = _reward_weights(config.reward_weights, names)
    rewards = [Reward(func, weight, source) for (func, source), weight in zip(weighted, weights, strict=True)]
    if config.format_reward_weight:
        rewards.insert(1, Reward(format_reward(task.style), config.format_reward_weight, "--format_reward_weight"))
        names.insert(1, (reward_name(rewards[1].func), rewards[1].source))
    seen: dict[str, str] = {}
    for name, source in names:
        if name in seen:
            raise LoptError(
                f"two reward functions are named {name!r} ({seen[name]} and {source}); each function's "
                "scores are logged under its name, so they would mix. Rename one (or wrap it in a function of "
                "another name)."
            )
        seen[name] = source
    return rewards


def _reward_weights(value: str | None, names: list[tuple[str, str]]) -> list[float]:
    """--reward_weights for the functions `names` ((name, flag that adds it) each), 1 each when it is not given."""
    if value is None:
        return [1.0] * len(names)
    order = ", ".join(f"{name} ({source})" for name, source in names)
    try:
        weights = [float(item) for item in split_list(value)]
    except ValueError as error:
        raise LoptError(
            f"--reward_weights {value}: expected comma-separated numbers, one per reward function: {order}."
        ) from error
    if len(weights) != len(names):
        raise LoptError(
            f"--reward_weights {value} gives {len(weights)} weight(s) for {len(names)} reward function(s); pass one "
            f"per function, in this order: {order}. (The format reward's weight is --format_reward_weight.)"
        )
    if not all(math.isfinite(w) for w in weights):
        raise LoptError(f"--reward_weights {value}: every weight must be a finite number.")
    return weights
