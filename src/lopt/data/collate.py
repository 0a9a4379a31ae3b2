"""Conversations -> token ids with assistant-only labels -> padded batches.

A conversation is rendered with the tokenizer's chat template (or a plain template for tokenizers
without one) and only the assistant turns are trained: every other token gets the label -100.

How the assistant spans are found: for each assistant turn the template renders the conversation
up to that turn with the generation prompt, and then including the turn; the turn's text is the
difference. The pieces are tokenized separately and concatenated, so the prompt is tokenized
exactly as ``build_prompt`` + tokenizer do at inference and the labelled ids are exactly the
answer the model should produce after it. This needs the template to render a conversation's
prefix as a prefix of the whole (ChatML does); when a template does not, only the final assistant
turn is trained, after the same prompt ``build_prompt`` gives.

With ``prompt_format="reference"`` the records the reference implementation writes as plain text
(``formats.to_reference_text``) are that text instead: the prompt untrained, the answer trained and
ended with EOS, as above; other records still go through the chat template.
"""

from __future__ import annotations

import bisect
import logging

import torch

from lopt.data.formats import PROMPT_FORMATS, detect_format, to_messages, to_reference_text
from lopt.errors import LoptError, unknown_choice
from lopt.output import plural

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross-entropy skips

# Used when the tokenizer has no chat template (base models). Each assistant turn ends with EOS so
# that the model learns to stop after answering, as it does with ChatML's <|im_end|>.
PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def tokenize_sft(
    records: list[dict], tokenizer, max_seq_length: int, prompt_format: str = "chat"
) -> tuple[list[dict], dict]:
    """Tokenize SFT records into ``{"input_ids": [...], "labels": [...]}`` examples.

    ``prompt_format`` is ``"chat"`` (every record through the chat template) or ``"reference"``
    (Alpaca and text prompt/completion records as the reference implementation's plain text).

    Returns ``(examples, stats)`` with ``stats = {"examples", "truncated", "skipped_truncated", "tokens",
    "trained_tokens"}``. Sequences longer than ``max_seq_length`` are cut at the end: a kept example
    that was cut counts in ``truncated``, one with no trained token left is skipped and counted in
    ``skipped_truncated``. Records are named ``record <i>`` (0-based index into ``records``) in error
    messages.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise unknown_choice("--prompt_format", prompt_format, PROMPT_FORMATS)
    if not records:
        raise LoptError("no records to tokenize")
    if tokenizer.eos_token_id is None:
        raise LoptError("the tokenizer has no eos_token; set one so the model learns where an answer ends")
    fmt = detect_format(records[0])
    examples, truncated, skipped, tokens, trained, fallbacks, chat = [], 0, 0, 0, 0, 0, 0
    for index, record in enumerate(records):
        where = f"record {index}"
        plain = to_reference_text(record, where=where, fmt=fmt) if prompt_format == "reference" else None
        if plain is not None:
            segments = [(plain[0], False), (plain[1], True)]
        else:
            chat += 1
            messages = to_messages(record, where=where, fmt=fmt)
            segments = _segments(tokenizer, messages)
            if segments is None:
                fallbacks += 1
                segments = _final_turn_segments(tokenizer, messages)
        input_ids, labels = _ids_and_labels(tokenizer, segments)
        cut = len(input_ids) > max_seq_length
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
        n_trained = sum(label != IGNORE_INDEX for label in labels)
        if n_trained == 0:
            skipped += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
        truncated += cut
        tokens += len(input_ids)
        trained += n_trained
    if prompt_format == "reference" and chat:
        logger.info(
            "--prompt_format reference: %d of %d records (shape %r) have no plain-text form in the reference; "
            "they go through the chat template",
            chat,
            len(records),
            fmt,
        )
    if fallbacks:
        logger.warning(
            "the chat template does not render a conversation's beginning as a prefix of the whole "
            "for %d of %d records; only their final assistant turn is trained",
            fallbacks,
            len(records),
        )
    if not examples:
        raise LoptError(
            f"all {len(records)} examples were truncated away: no answer token fits in "
            f"--max_seq_length {max_seq_length}; raise --max_seq_length"
        )
    stats = {
        "examples": len(examples), "truncated": truncated, "skipped_truncated": skipped, "tokens": tokens,
        "trained_tokens": trained,
    }  # fmt: skip
    return examples, stats


def build_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model continues to answer: the conversation plus the assistant header.

    A trailing assistant message (as ``to_messages`` returns) is the answer and is left out. The
    text already holds any BOS token, so tokenize it with ``add_special_tokens=False``.
    """
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _render(tokenizer, messages, generation_prompt=True)


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example; padding is masked out of attention and labels.

    Packed examples (`pack_examples`) also get `position_ids`; their padding's positions restart at 0, so the
    padding is one more sequence of the row and no real token attends to it (`attention_mask` then only marks
    the real tokens for counting and for the local losses: the model is run on the positions alone)."""
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in examples[0]
    position_ids = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        if packed:
            position_ids[row, :n] = torch.tensor(example["position_ids"], dtype=torch.long)
            position_ids[row, n:] = torch.arange(length - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {**batch, "position_ids": position_ids} if packed else batch


def pack_examples(examples: list[dict], max_seq_length: int) -> list[dict]:
    """`tokenize_sft` examples packed into rows of at most `max_seq_length` tokens (--packing).

    Best-fit decreasing, as TRL's "bfd" strategy: longest example first, each into the row whose free space it
    fills best, a new row when none has room. An example is never split (a cut answer would lose its prompt), so
    the rows are at least as many as the examples' tokens over `max_seq_length`. Each row's `position_ids`
    restart at 0 at every example: transformers then builds a block-diagonal causal mask from them (no example
    attends to another) and the rotary positions are each example's own. The first label of every example is
    ignored: it would be predicted from the previous example's last token (unpacked, nothing predicts it).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted: the best fit is the first with enough room
    for index in order:
        n = len(examples[index]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([index])
            left, row = max_seq_length - n, len(rows) - 1
        else:
            left, row = free.pop(at)
            rows[row].append(index)
            left -= n
        if left > 0:
            bisect.insort(free, (left, row))
    return [_packed_row([examples[i] for i in members]) for members in rows]


def packing_summary(rows: int, tokens: int, max_seq_length: int) -> str:
    """How `pack_examples` packed `tokens` tokens: the rows and the share of their room the tokens fill."""
    return (
        f"packed into {plural(rows, 'sequence')} of up to {max_seq_length} tokens "
        f"({tokens / (rows * max_seq_length):.1%} filled)"
    )


def _packed_row(members: list[dict]) -> dict:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in members:
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX, *example["labels"][1:]]
        row["position_ids"] += range(len(example["input_ids"]))
    return row


def _segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]] | None:
    """The rendered conversation as ``(text, trained)`` pieces, or None if the prefix property fails."""
    segments, rendered = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        with_turn = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (prompt.startswith(rendered) and with_turn.startswith(prompt)):
            return None
        segments += [(prompt[len(rendered) :], False), (with_turn[len(prompt) :], True)]
        rendered = with_turn
    return segments


def _final_turn_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Fallback for templates without the prefix property: the inference prompt + the final answer."""
    return [(build_prompt(tokenizer, messages), False), (messages[-1]["content"], True)]


def _ids_and_labels(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Tokenize the pieces; label the trained ones, up to their EOS; end the last one with EOS."""
    eos = tokenizer.eos_token_id
    input_ids, labels, answer_has_eos = [], [], False
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        piece_labels = list(ids) if trained else [IGNORE_INDEX] * len(ids)
        if trained:
            answer_has_eos = eos in ids
            if answer_has_eos:
                # What a template writes after the turn's EOS (ChatML's "\n") is never generated:
                # the model stops at EOS. Keep it in the input but do not train on it.
                end = len(ids) - ids[::-1].index(eos)
                piece_labels[end:] = [IGNORE_INDEX] * (len(ids) - end)
        input_ids += ids
        labels += piece_labels
    if not answer_has_eos:  # the template did not end the final answer with EOS
        input_ids.append(eos)
        labels.append(eos)
    return input_ids, labels


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _render_plain(tokenizer, messages, generation_prompt)


def _render_plain(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    # Models whose tokenizer has a distinct BOS (Llama, Mistral) were trained with it at the start;
    # GPT-2-style tokenizers reuse EOS as BOS and were not.
    bos = tokenizer.bos_token if tokenizer.bos_token and tokenizer.bos_token != tokenizer.eos_token else ""
    parts = [bos]
    for message in messages:
        end = tokenizer.eos_token if message["role"] == "assistant" else ""
        parts.append(f"{PLAIN_HEADERS[message['role']]}{message['content']}{end}\n\n")
    if generation_prompt:
        parts.append(PLAIN_HEADERS["assistant"])
    return "".join(parts)
