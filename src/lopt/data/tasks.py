"""The task registry: where a task's problems come from (a hub dataset, or a generator), how its prompt asks for the
answer, how a completion is scored, and which problems are held out to evaluate it.

It lives with the data because the data needs it: GRPO prompts (presets.py) are a task's problems in its answer
style. The rewards a GRPO run trains on (lopt/tasks.py: the task's, the user's --reward_funcs, the format reward)
and `lopt eval` (evaluation/) read the same `TASKS`, so a task added here is trained, rewarded and evaluated the
same way everywhere. To add one: a `Task` with its source, its answer style (answers.py), its correctness reward
(rewards.py) and, if it can be evaluated, a held-out loader.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from lopt.answers import with_answer_instruction
from lopt.data.generated import DEFAULT_GSM_SAMPLES, gsm_symbolic_records, reasoning_gym_records
from lopt.data.sources import check_select_samples, load_hub
from lopt.errors import LoptError, unknown_choice
from lopt.rewards import RewardFunc, boxed_accuracy, gsm8k_accuracy, gsm_symbolic_score, number_accuracy

# Generated problems for evaluation come from this seed; any that also appears in the training set is
# dropped (reasoning-gym's seeds are not disjoint, see `heldout_generated`).
EVAL_SEED = 10_000

Generator = Callable[[int, int], list[dict]]  # (size, seed) -> {"question", "answer"} records, offline


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    style: str  # where the final answer is written: "hash" (#### <answer>) or "boxed" (\boxed{<answer>})
    reward: RewardFunc  # correctness of a completion against the gold answer, TRL's reward signature
    hub_id: str | None = None  # None: generated offline by `generate`
    hub_config: str | None = None
    # (n, questions to exclude) -> n held-out {"question", "answer"} records; None: not evaluable
    heldout: Callable[[int, set[str]], list[dict]] | None = None
    generate: Generator | None = None  # the offline tasks' problems; their held-out ones come from it too

    def __post_init__(self):
        if self.generate is not None and self.heldout is None:
            object.__setattr__(self, "heldout", functools.partial(heldout_generated, self.generate))

    def records(self, split: str, max_samples: int | None, seed: int, select_samples: str = "first") -> list[dict]:
        """The task's own training problems: hub rows as they are (`max_samples` picked as `select_samples`
        says), or generated {"prompt", "answer"} rows, random already, whose prompt carries the answer instruction."""
        check_select_samples(select_samples)  # the generated path does not use it, but a wrong value is still wrong
        if self.hub_id is not None:
            return load_hub(self.hub_id, self.hub_config, split, max_samples, select_samples, seed)
        size = DEFAULT_GSM_SAMPLES if max_samples is None else max_samples
        return [{"prompt": r["question"], "answer": r["answer"]} for r in self.generate(size, seed)]


def heldout_generated(generate: Generator, n: int, exclude: set[str], seed: int = EVAL_SEED) -> list[dict]:
    """The first `n` problems `generate` makes from `seed` that are not in `exclude`.

    reasoning-gym draws each problem from its own seed and index, so a generated set is a prefix of
    any larger one from the same seed; growing the set until `n` survive keeps the choice stable.
    """
    size = n
    while True:
        kept = [r for r in generate(size, seed) if r["question"] not in exclude]
        if len(kept) >= n:
            return kept[:n]
        size *= 2


def gsm8k_test(n: int, exclude: set[str] = frozenset()) -> list[dict]:
    """The first `n` problems of GSM8K's test split, from the hub (disjoint from its train split)."""
    import datasets

    try:
        split = datasets.load_dataset("openai/gsm8k", "main", split="test")
    except Exception as error:  # offline, blocked or renamed: all mean this task cannot run here
        raise LoptError(
            f"--task gsm8k needs the GSM8K test split from the Hugging Face hub, which could not be loaded "
            f"({type(error).__name__}: {error}). Offline, use --task gsm-symbolic."
        ) from error
    rows = split.select(range(min(n, len(split))))
    return [{"question": with_answer_instruction(r["question"]), "answer": r["answer"]} for r in rows]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "gsm-symbolic", "grade-school math word problems (reasoning-gym gsm_symbolic, offline)", "hash",
            gsm_symbolic_score, generate=gsm_symbolic_records,
        ),
        Task(
            "aiw", "'Alice has N sisters...' sibling and friend counting, one-number answers (reasoning-gym aiw, "
            "offline; the study's task)", "number", number_accuracy,
            generate=functools.partial(reasoning_gym_records, "aiw", style="number"),
        ),
        Task(
            "chain-sum", "one-digit sums and differences such as '5 - 9 =', asked as reasoning-gym states them "
            "(chain_sum, offline; the study's retention task)", "number", number_accuracy,
            generate=functools.partial(
                reasoning_gym_records, "chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1
            ),
        ),
        Task("gsm8k", "GSM8K grade-school math (hub)", "hash", gsm8k_accuracy, "openai/gsm8k", "main", gsm8k_test),
        Task("numinamath", "NuminaMath-CoT competition math (hub)", "boxed", boxed_accuracy, "AI-MO/NuminaMath-CoT"),
    )
}  # fmt: skip
EVALUABLE_TASKS = tuple(name for name, task in TASKS.items() if task.heldout is not None)


def get_task(name: str, evaluable: bool = False) -> Task:
    """The task called `name`, or an error naming the closest and listing every one (`evaluable`: those
    `lopt eval` can score)."""
    names = EVALUABLE_TASKS if evaluable else tuple(TASKS)
    if name not in names:
        raise unknown_choice("--task", name, {n: TASKS[n].description for n in names})
    return TASKS[name]
