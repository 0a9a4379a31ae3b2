"""Final answers: where a model's answer is in its text, and when two answers are the same.

One concept, used by the prompts (which ask for the answer in a style), the GRPO rewards and
evaluation, so that what training asks for and rewards is exactly what evaluation counts as correct.

- ``with_answer_instruction(question, style)``: the question followed by the sentence that asks for
  the final answer in that style.

- ``extract_final_answer(text, "hash")``: the number after the last ``####`` (the GSM8K convention),
  falling back to the last number in the text (``"number"``, the short-answer style, reads it the same
  way); ``"boxed"``: the content of the last ``\\boxed{...}``
  (the NuminaMath / MATH convention), nested braces included.
- ``normalize_number``: a canonical numeric string (``"1,000.50"`` -> ``"1000.5"``) or None.
- ``answers_match``: numeric equality when both sides are numbers, normalized text equality otherwise.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ANSWER_STYLES = ("hash", "boxed", "number")
GSM_ANSWER_INSTRUCTION = (
    "Solve the problem step by step, then write the final answer as a number on the last line "
    "in the form: #### <answer>"
)
BOXED_ANSWER_INSTRUCTION = "Solve the problem step by step, then write the final answer in \\boxed{}."
# Short-answer tasks (aiw): the answer alone, so that generation stops after a few tokens.
NUMBER_ANSWER_INSTRUCTION = "Answer with only the final number."
ANSWER_INSTRUCTIONS = {
    "hash": GSM_ANSWER_INSTRUCTION,
    "boxed": BOXED_ANSWER_INSTRUCTION,
    "number": NUMBER_ANSWER_INSTRUCTION,
}

# A number as people write it: optional sign, digits with optional thousands separators, optional
# decimals, or a bare decimal such as ".5". A minus sign right before the digits belongs to it.
_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-\u2212]?\.\d+")
_CANONICAL_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_BOXED = "\\boxed{"


def with_answer_instruction(question: str, style: str = "hash") -> str:
    """A question followed by the instruction on how to write the final answer (`####` or `\\boxed{}`)."""
    return f"{question}\n{ANSWER_INSTRUCTIONS[style]}"


def extract_final_answer(text: str, style: str = "hash") -> str | None:
    """The final answer in `text` as written (e.g. ``"1,000"``, ``"-3"``, ``"\\frac{1}{2}"``), or None."""
    if style in ("hash", "number"):  # a bare number is read as the last number, as a "####" line's fallback
        return _hash_answer(text)
    if style == "boxed":
        return _boxed_answer(text)
    raise ValueError(f"unknown answer style {style!r}; choose one of: {', '.join(ANSWER_STYLES)}")


def _hash_answer(text: str) -> str | None:
    marker = text.rfind("####")
    if marker >= 0:
        after = _NUMBER.search(text, marker + 4)
        if after:
            return after.group(0).replace("\u2212", "-")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace("\u2212", "-") if numbers else None


def _boxed_answer(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None  # unbalanced: the completion was cut off inside the box


def normalize_number(text: str | None) -> str | None:
    """``"$1,000.50."`` -> ``"1000.5"``, ``"72.00"`` -> ``"72"``, ``"-3"`` -> ``"-3"``; None if not a number."""
    if text is None:
        return None
    cleaned = re.sub(r"[\s$,]", "", text).replace("\u2212", "-").rstrip(".")
    if not _CANONICAL_NUMBER.fullmatch(cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _normalize_text(text: str) -> str:
    return re.sub(r"[\s$]", "", text).rstrip(".")


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numeric equality when both parse as numbers (``72`` == ``72.0``, ``1,000`` == ``1000``), else text equality."""
    if predicted is None:
        return False
    predicted_number, gold_number = normalize_number(predicted), normalize_number(gold)
    if predicted_number is not None and gold_number is not None:
        return Decimal(predicted_number) == Decimal(gold_number)
    return _normalize_text(predicted) == _normalize_text(gold)
