"""Record shapes -> one chat conversation.

Every SFT data source ends up as a list of records (dicts). Datasets disagree on column names, so
the shape is detected once per dataset from its columns and each record is turned into a
conversation ``[{"role": ..., "content": ...}, ...]`` that ends with an assistant message; the
tokenizer then renders that conversation with the model's chat template (see ``collate.py``).

``--prompt_format reference`` renders the two shapes the LoPT reference implementation writes as
plain text (Alpaca, and prompt/completion with text on both sides) as that text instead
(``to_reference_text``); every other shape still becomes a conversation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lopt.errors import LoptError

ROLES = ("system", "user", "assistant")

# --prompt_format: how SFT records become token sequences.
PROMPT_FORMATS = {
    "chat": "every record through the model's chat template",
    "reference": "Alpaca and text prompt/completion records as the reference implementation's plain text",
}


@dataclass(frozen=True)
class Shape:
    """One accepted record shape: the columns that identify it and an example dataset."""

    required: tuple[str, ...]
    optional: tuple[str, ...]
    example: str

    def columns_text(self) -> str:
        optional = [f"{c} (optional)" for c in self.optional]
        return ", ".join([*self.required, *optional])


# Checked in this order: some datasets carry several shapes at once (NuminaMath-CoT has `messages`
# next to `problem`/`solution`, UltraChat has `messages` next to `prompt`); the richest one wins.
SHAPES: dict[str, Shape] = {
    "messages": Shape(("messages",), (), "Tulu 3 / chat datasets"),
    "prompt_completion": Shape(("prompt", "completion"), (), "TRL prompt-completion"),
    "alpaca": Shape(("instruction", "output"), ("input",), "Alpaca"),
    "query_response": Shape(("query", "response"), (), "MetaMathQA"),
    "question_answer": Shape(("question", "answer"), (), "GSM8K"),
    "problem_solution": Shape(("problem", "solution"), (), "NuminaMath"),
}


def accepted_shapes_text() -> str:
    """The accepted shapes, one per line, for error messages and help text."""
    return "\n".join(f"  - {name}: {shape.columns_text()}  ({shape.example})" for name, shape in SHAPES.items())


def detect_format(columns: Iterable[str]) -> str:
    """Name of the first shape in ``SHAPES`` whose required columns are all present."""
    present = set(columns)
    for name, shape in SHAPES.items():
        if present.issuperset(shape.required):
            return name
    found = ", ".join(sorted(present)) or "(none)"
    raise LoptError(
        f"cannot tell the record shape from the columns found: {found}.\n"
        f"Accepted shapes (columns):\n{accepted_shapes_text()}\n"
        "Rename the columns of your data to one of these shapes."
    )


def to_messages(record: dict, *, where: str = "", fmt: str | None = None) -> list[dict]:
    """Turn one record into a conversation ending with an assistant message.

    ``fmt`` is the shape from ``detect_format`` (detected once per dataset by the caller); when left
    out it is detected from this record's keys. ``where`` names the record in error messages, e.g.
    ``"train.jsonl:17"`` or ``"record 17"``.
    """
    fmt, where = _checked(record, where, fmt)
    return _CONVERTERS[fmt](record, where)


def to_reference_text(record: dict, *, where: str = "", fmt: str | None = None) -> tuple[str, str] | None:
    """The reference implementation's plain text for one record, as ``(prompt, answer)``.

    Alpaca: ``"Instruction: {instruction}\\n"``, then ``"{input}\\n"`` when the input is not empty,
    then ``"Response:\\n"``; the answer is the output. prompt/completion with text (not message
    lists) on both sides: the prompt and the completion as they are. Any other record: None (the
    reference has no plain text for it; it goes through ``to_messages`` and the chat template).
    """
    fmt, where = _checked(record, where, fmt)
    if fmt == "alpaca":
        instruction, extra = _alpaca_prompt(record, where)
        prompt = f"Instruction: {instruction}\n" + (f"{extra}\n" if extra else "") + "Response:\n"
        return prompt, _text(record["output"], where, "output")
    if fmt == "prompt_completion" and isinstance(record["prompt"], str) and isinstance(record["completion"], str):
        return record["prompt"], record["completion"]
    return None


def _checked(record: dict, where: str, fmt: str | None) -> tuple[str, str]:
    """``(shape, where)`` of a record that has its shape's columns; an error naming the record otherwise."""
    if not isinstance(record, dict):
        raise LoptError(f"{where or 'record'}: expected a JSON object (a dict of columns), got {_type_name(record)}")
    fmt = fmt or detect_format(record)
    if fmt not in _CONVERTERS:
        raise LoptError(f"unknown record shape {fmt!r}; accepted: {', '.join(SHAPES)}")
    where = where or "record"
    for column in SHAPES[fmt].required:
        if column not in record:
            raise LoptError(
                f"{where}: missing column {column!r}; the dataset was detected as shape {fmt!r} "
                f"({SHAPES[fmt].columns_text()}) but this record has: {', '.join(sorted(record))}"
            )
    return fmt, where


def _from_messages(record: dict, where: str) -> list[dict]:
    messages = _message_list(record["messages"], where, "messages")
    # Turns after the last assistant message carry nothing to train on; drop them so every
    # conversation ends with the answer.
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last_assistant is None:
        raise LoptError(f"{where}: field 'messages' has no assistant turn; at least one is needed to train on")
    return messages[: last_assistant + 1]


def _from_prompt_completion(record: dict, where: str) -> list[dict]:
    # TRL allows either side to be plain text or a list of messages.
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):
        prompt_messages = _message_list(prompt, where, "prompt")
    else:
        prompt_messages = [{"role": "user", "content": _text(prompt, where, "prompt")}]
    if isinstance(completion, list):
        completion_messages = _message_list(completion, where, "completion")
        if not completion_messages or completion_messages[-1]["role"] != "assistant":
            raise LoptError(f"{where}: field 'completion' must end with an assistant message")
    else:
        completion_messages = [{"role": "assistant", "content": _text(completion, where, "completion")}]
    return prompt_messages + completion_messages


def _from_alpaca(record: dict, where: str) -> list[dict]:
    instruction, extra = _alpaca_prompt(record, where)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return _pair(prompt, _text(record["output"], where, "output"))


def _alpaca_prompt(record: dict, where: str) -> tuple[str, str]:
    """The instruction and the input ("" when there is none)."""
    extra = record.get("input")
    return _text(record["instruction"], where, "instruction"), "" if extra is None else _text(extra, where, "input")


def _columns_pair(prompt_column: str, answer_column: str) -> Callable[[dict, str], list[dict]]:
    def convert(record: dict, where: str) -> list[dict]:
        prompt = _text(record[prompt_column], where, prompt_column)
        return _pair(prompt, _text(record[answer_column], where, answer_column))

    return convert


_CONVERTERS: dict[str, Callable[[dict, str], list[dict]]] = {
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
    "alpaca": _from_alpaca,
    "query_response": _columns_pair("query", "response"),
    "question_answer": _columns_pair("question", "answer"),
    "problem_solution": _columns_pair("problem", "solution"),
}


def _pair(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise LoptError(f"{where}: field {field!r} must be text (a string), got {_type_name(value)}: {value!r:.60}")
    return value


def _message_list(value: Any, where: str, field: str) -> list[dict]:
    """Validate a list of {role, content} dicts; returns clean copies without extra keys."""
    if not isinstance(value, list):
        # CSV cells are always text, so a conversation column read from a .csv file lands here.
        csv_hint = (
            "; a CSV cell holds only text: keep conversations in .jsonl or .parquet" if isinstance(value, str) else ""
        )
        raise LoptError(
            f"{where}: field {field!r} must be a list of {{role, content}} messages, got {_type_name(value)}{csv_hint}"
        )
    messages = []
    for i, message in enumerate(value):
        item = f"{field}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise LoptError(f"{where}: field {item!r} must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise LoptError(f"{where}: field {item}.role is {message['role']!r}; expected one of: {', '.join(ROLES)}")
        messages.append({"role": message["role"], "content": _text(message["content"], where, f"{item}.content")})
    return messages


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
