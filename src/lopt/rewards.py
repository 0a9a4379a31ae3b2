"""Verifiable rewards for GRPO, each a plain function with TRL's reward signature.

``f(completions, **kwargs) -> list[float]``: TRL passes the sampled completions (strings, or
conversations ``[{"role": "assistant", "content": ...}]`` when the prompts were conversations) and
every other dataset column as a keyword argument; the GRPO data carries the gold final answer in
the column ``answer``. Answers are parsed and compared by ``lopt.answers``, the same code that
evaluation uses.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from lopt.answers import ANSWER_STYLES, answers_match, extract_final_answer, normalize_number

RewardFunc = Callable[..., list[float]]


def completion_text(completion) -> str:
    """The text of one completion: a string as is, a conversation's last message's content."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def gsm8k_accuracy(completions, answer, **kwargs) -> list[float]:
    """1.0 when the number after the last ``####`` (else the last number) equals the gold answer."""
    return [
        float(answers_match(extract_final_answer(completion_text(c), "hash"), gold))
        for c, gold in zip(completions, answer, strict=True)
    ]


def boxed_accuracy(completions, answer, **kwargs) -> list[float]:
    """1.0 when the last ``\\boxed{...}`` equals the gold answer (numerically, or as normalized text)."""
    return [
        float(answers_match(extract_final_answer(completion_text(c), "boxed"), gold))
        for c, gold in zip(completions, answer, strict=True)
    ]


@functools.cache
def _gsm_symbolic_scorer():
    import reasoning_gym  # a second to import; only this reward needs it

    # score_answer reads only the entry it is given, so any instance of the task scores any entry.
    return reasoning_gym.create_dataset("gsm_symbolic", size=1, seed=0)


def gsm_symbolic_score(completions, answer, **kwargs) -> list[float]:
    """reasoning-gym's own score for gsm_symbolic: 1.0 correct, 0.01 a wrong number, 0.0 no number.

    The model's final answer is located as for GSM8K and normalized first (``1,000`` -> ``1000``),
    because the scorer reads the first number of the string it is given. Its pattern
    (``\\b-?\\d+...``) drops a leading minus sign, so it would score a correct negative answer 0.01;
    gsm_symbolic's answers are non-negative quantities (none of 2,000 generated problems has a
    negative one), so the score is left as reasoning-gym defines it.
    """
    scorer = _gsm_symbolic_scorer()
    scores = []
    for c, gold in zip(completions, answer, strict=True):
        predicted = extract_final_answer(completion_text(c), "hash")
        scores.append(float(scorer.score_answer(normalize_number(predicted) or predicted, {"answer": gold})))
    return scores


# The last line of the completion is "#### <number>" and nothing follows it.
_HASH_LAST_LINE = re.compile(r"####[ \t]*\$?[ \t]*[-\u2212]?[\d,]*\.?\d+\.?\Z")


def _well_formatted(text: str, style: str) -> bool:
    if style == "boxed":
        return extract_final_answer(text, "boxed") is not None  # a closed \boxed{...}
    return bool(_HASH_LAST_LINE.search(text.strip()))


def format_reward(style: str) -> RewardFunc:
    """A reward of 1.0 for completions that give their answer in the format of `style` ("hash" or "boxed")."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer style {style!r}; choose one of: {', '.join(ANSWER_STYLES)}")

    def reward(completions, **kwargs) -> list[float]:
        return [float(_well_formatted(completion_text(c), style)) for c in completions]

    reward.__name__ = f"format_{style}"  # TRL names the reward's metrics after the function
    return reward
