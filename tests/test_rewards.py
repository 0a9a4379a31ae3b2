"""Final-answer parsing (lopt.answers) and the GRPO rewards (lopt.rewards) on realistic completions."""

import pytest

from lopt.answers import answers_match, extract_final_answer, normalize_number
from lopt.rewards import (
    boxed_accuracy,
    completion_text,
    format_reward,
    gsm8k_accuracy,
    gsm_symbolic_score,
)

WORKED = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48 + 24 = 72 clips altogether in April and May.\n#### 72"


@pytest.mark.parametrize(
    "text, expected",
    [
        (WORKED, "72"),
        ("The total is $1,250.\n#### $1,250.", "1,250"),
        ("He ends with 5 - 12 = -7 degrees.\n#### -7", "-7"),
        ("#### 3\nWait, I made a mistake: 4 + 5 = 9.\n#### 9", "9"),  # several ####: the last one counts
        ("So the answer is 12 apples, then 7 are eaten, leaving 5.", "5"),  # no ####: the last number
        ("#### \nThe answer is 42", "42"),  # nothing after the last ####: the last number in the text
        ("I am not sure how to solve this.", None),
        ("The price is 0.50 dollars each, so 3 cost 1.50\n#### 1.5", "1.5"),
    ],
)
def test_extract_hash_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So $x = \\frac{3}{4}$, i.e. \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
        ("First \\boxed{2}, corrected: \\boxed{\\sqrt{2}+1}", "\\sqrt{2}+1"),
        ("The answer is \\boxed{ 12 }.", "12"),
        ("The answer is \\boxed{\\frac{1}{2", None),  # cut off inside the box
        ("The answer is 12.", None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_final_answer(text, "boxed") == expected


def test_unknown_style_is_an_error():
    with pytest.raises(ValueError, match="hash"):
        extract_final_answer("1", "latex")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("72", "72"),
        ("72.00", "72"),
        ("$1,000.", "1000"),
        (" -3 ", "-3"),
        ("1,000.50", "1000.5"),
        ("\u22124", "-4"),
        (".5", "0.5"),
        ("twelve", None),
        ("3/4", None),
        ("", None),
        (None, None),
        ("1e5", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "predicted, gold, same",
    [
        ("72", "72", True),
        ("72.0", "72", True),
        ("72.00", "72.0", True),
        ("1,000", "1000", True),
        ("$18", "18", True),
        ("-7", "-7", True),
        ("7", "-7", False),
        ("71", "72", False),
        (None, "72", False),
        ("\\frac{3}{4}", "\\frac{3}{4}", True),
        ("\\frac {3}{4}", "\\frac{3}{4}", True),
        ("x=2", "2", False),
    ],
)
def test_answers_match(predicted, gold, same):
    assert answers_match(predicted, gold) is same


def test_completion_text_of_plain_and_conversational_completions():
    assert completion_text("#### 4") == "#### 4"
    assert completion_text([{"role": "assistant", "content": "#### 4"}]) == "#### 4"


def test_gsm8k_accuracy_on_realistic_completions():
    completions = [
        WORKED,
        "48 + 24 = 72.\n#### 72.0",
        "The answer is 1,000 dollars.\n#### $1,000",
        "It drops to -7 degrees.\n#### -7",
        "#### 70\nLet me recheck: 48 + 24 = 72\n#### 72",
        "I think it is 24.",  # no ####: the last number, wrong here
        "I cannot solve this.",
    ]
    gold = ["72", "72", "1000", "-7", "72", "72", "72"]
    assert gsm8k_accuracy(completions, answer=gold) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    assert gsm8k_accuracy(conversational, answer=gold) == gsm8k_accuracy(completions, answer=gold)


def test_boxed_accuracy():
    completions = ["Thus \\boxed{\\frac{1}{2}}.", "So \\boxed{0.50}", "So \\boxed{3}", "no box, 1/2"]
    gold = ["\\frac{1}{2}", "0.5", "4", "\\frac{1}{2}"]
    assert boxed_accuracy(completions, answer=gold) == [1.0, 1.0, 0.0, 0.0]


def test_gsm_symbolic_uses_reasoning_gyms_score():
    completions = ["5 * 4 = 20\n#### 20", "#### 1,200", "5 * 4 = 21\n#### 21", "I do not know."]
    # reasoning-gym scores a wrong number 0.01 and no number 0.0
    assert gsm_symbolic_score(completions, answer=["20", "1200", "20", "20"]) == [1.0, 1.0, 0.01, 0.0]


def test_format_rewards():
    hash_format, boxed_format = format_reward("hash"), format_reward("boxed")
    assert hash_format.__name__ == "format_hash"
    assert hash_format(["work\n#### 72", "work\n#### -1,000.5\n", "#### 72\nmore text", "72"]) == [1.0, 1.0, 0.0, 0.0]
    assert boxed_format(["\\boxed{x^{2}}", "\\boxed{x", "x"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        format_reward("latex")
