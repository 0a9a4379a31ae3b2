"""Reward functions of a user's own module, for `--reward_funcs custom_rewards:...` in the tests (on sys.path
through conftest.py, as a user's module would be on PYTHONPATH)."""

from lopt.rewards import completion_text

THRESHOLD = 0.5  # not a function: --reward_funcs custom_rewards:THRESHOLD is an error


def completion_chars(prompts, completions, answer, **kwargs) -> list[float]:
    """The length of each completion in characters; it needs the data's answer column, as a correctness reward would."""
    assert len(prompts) == len(completions) == len(answer) and all(isinstance(a, str) for a in answer)
    return [float(len(completion_text(c))) for c in completions]


def answer_only(completions, answer) -> list[float]:
    """No **kwargs: TRL's keyword arguments (prompts, trainer_state, ...) have nowhere to go."""
    return [0.0 for _ in completions]
