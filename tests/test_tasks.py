"""The task registry that presets, rewards and evaluation share, and the one did-you-mean error."""

from __future__ import annotations

import pytest

from lopt.answers import ANSWER_INSTRUCTIONS, ANSWER_STYLES
from lopt.data.presets import grpo_records
from lopt.data.tasks import EVALUABLE_TASKS, TASKS, get_task
from lopt.errors import LoptError, did_you_mean, unknown_choice
from lopt.evaluation.task import load_task, score


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_rewards_its_own_gold_answer_in_its_own_style(name):
    task = TASKS[name]
    assert task.style in ANSWER_STYLES and task.description
    written = "so the answer is\n#### 42" if task.style == "hash" else "so the answer is \\boxed{42}"
    assert task.reward([written, "no answer here"], answer=["42", "42"]) == [1.0, 0.0]


def test_grpo_prompts_and_evaluation_ask_and_score_as_the_task_says():
    records = grpo_records("gsm-symbolic", max_samples=3, seed=0)
    assert all(r["prompt"][0]["content"].endswith(ANSWER_INSTRUCTIONS["hash"]) for r in records)
    heldout = load_task("gsm-symbolic", 2, exclude=set())
    assert all(r["question"].endswith(ANSWER_INSTRUCTIONS["hash"]) for r in heldout)
    golds = [r["answer"].rsplit("####", 1)[1].strip() for r in heldout]
    assert score(heldout, [f"#### {g}" for g in golds], style=TASKS["gsm-symbolic"].style)["correct"] == 2


def test_a_task_without_held_out_problems_is_refused_by_evaluation_with_the_ones_that_have_them():
    assert "numinamath" in TASKS and "numinamath" not in EVALUABLE_TASKS
    with pytest.raises(LoptError) as error:
        load_task("numinamath", 2, set())
    assert all(name in str(error.value) for name in EVALUABLE_TASKS)
    with pytest.raises(LoptError, match=r"unknown --task 'gsm8'\. Did you mean 'gsm8k'\?"):
        get_task("gsm8")


def test_unknown_choice_names_the_closest_and_lists_every_option():
    message = str(unknown_choice("--backward", "jont", ["local", "joint"]))
    assert message == "unknown --backward 'jont'. Did you mean 'joint'? Choose one of: local, joint."
    described = str(unknown_choice("--task", "zzz", {"a": "first", "b": "second"}))
    assert described == "unknown --task 'zzz'. Choose one of:\n  a: first\n  b: second"
    assert did_you_mean("learnig_rate", ["learning_rate", "seed"]) == " Did you mean 'learning_rate'?"
