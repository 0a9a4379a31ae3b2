"""Unit tests for lopt.data: record shapes, sources, tokenization/masking and padding.

A tiny byte-level BPE tokenizer is trained in-process (no hub, no model), once with SmolLM2's
ChatML chat template and once without a template for the plain path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from lopt.answers import ANSWER_INSTRUCTIONS, GSM_ANSWER_INSTRUCTION
from lopt.data import generated
from lopt.data.collate import IGNORE_INDEX, build_prompt, collate, tokenize_sft
from lopt.data.formats import SHAPES, detect_format, to_messages, to_reference_text
from lopt.data.presets import PRESETS, load_records, preference_records
from lopt.errors import LoptError
from tiny_models import CHATML, make_tokenizer, train_tiny_bpe


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tiny_bpe()


@pytest.fixture(scope="module")
def chatml(bpe):
    return make_tokenizer(bpe, chat_template=CHATML)


@pytest.fixture(scope="module")
def plain(bpe):
    return make_tokenizer(bpe, chat_template=None)


def labelled_spans(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    spans, current = [], []
    for label in example["labels"] + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


def qa(question="What is 2 + 2?", answer="The answer is 4."):
    return {"question": question, "answer": answer}


# --- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, prompt, answer",
    [
        ({"instruction": "Add.", "input": "2 and 2", "output": "4"}, "Add.\n\n2 and 2", "4"),
        ({"instruction": "Add.", "input": "", "output": "4"}, "Add.", "4"),
        ({"instruction": "Add.", "output": "4"}, "Add.", "4"),
        ({"query": "q?", "response": "r", "type": "MATH_AnsAug"}, "q?", "r"),
        ({"question": "q?", "answer": "a\n#### 1"}, "q?", "a\n#### 1"),
        ({"problem": "p?", "solution": "s", "source": "amc"}, "p?", "s"),
        ({"prompt": "p?", "completion": "c"}, "p?", "c"),
    ],
)
def test_pair_shapes(record, prompt, answer):
    assert to_messages(record) == [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_messages_shape_keeps_turns_and_drops_trailing_user_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "name": "bot"},
        {"role": "user", "content": "unanswered"},
    ]
    assert to_messages({"id": "x", "messages": messages}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_prompt_completion_as_message_lists():
    record = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    assert [m["role"] for m in to_messages(record)] == ["system", "user", "assistant"]


def test_messages_without_assistant_turn_is_an_error():
    with pytest.raises(LoptError, match="record 3: field 'messages' has no assistant turn"):
        to_messages({"messages": [{"role": "user", "content": "Hi"}]}, where="record 3")


def test_detect_format_prefers_messages_when_several_shapes_are_present():
    assert detect_format(["source", "problem", "solution", "messages"]) == "messages"
    assert detect_format(["question", "answer"]) == "question_answer"


def test_detect_format_error_lists_columns_found_and_accepted_shapes():
    with pytest.raises(LoptError) as error:
        detect_format(["text", "label"])
    message = str(error.value)
    assert "columns found: label, text" in message
    for name, shape in SHAPES.items():
        assert f"{name}: {shape.columns_text()}" in message
    assert "instruction, output, input (optional)" in message


def test_number_where_text_is_expected():
    with pytest.raises(LoptError) as error:
        to_messages({"question": "q", "answer": 42}, where="train.jsonl:17")
    assert "train.jsonl:17" in str(error.value) and "'answer'" in str(error.value) and "string" in str(error.value)


def test_unknown_role_is_named_with_accepted_roles():
    record = {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(
        LoptError, match=r"record 5: field messages\[0\].role is 'human'; expected one of: system, user, assistant"
    ):
        to_messages(record, where="record 5")


def test_content_not_a_string():
    record = {"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(LoptError, match=r"messages\[0\].content' must be text"):
        to_messages(record)


def test_record_missing_a_column_of_the_detected_shape():
    with pytest.raises(LoptError, match="record 1: missing column 'output'"):
        to_messages({"instruction": "x"}, where="record 1", fmt="alpaca")


@pytest.mark.parametrize(
    "record, prompt, answer",
    [
        ({"instruction": "Add.", "input": "2 and 2", "output": "4"}, "Instruction: Add.\n2 and 2\nResponse:\n", "4"),
        ({"instruction": "Add.", "input": "", "output": "4"}, "Instruction: Add.\nResponse:\n", "4"),
        ({"instruction": "Add.", "output": "4"}, "Instruction: Add.\nResponse:\n", "4"),
        ({"prompt": "Q: 2 + 2?\nA:", "completion": " 4"}, "Q: 2 + 2?\nA:", " 4"),
    ],
)
def test_reference_text_of_alpaca_and_prompt_completion(record, prompt, answer):
    assert to_reference_text(record) == (prompt, answer)


@pytest.mark.parametrize(
    "record",
    [
        qa(),
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"prompt": [{"role": "user", "content": "p"}], "completion": "c"},
    ],
)
def test_reference_text_leaves_other_shapes_to_the_chat_template(record):
    assert to_reference_text(record) is None


def test_reference_text_checks_the_record_as_to_messages_does():
    with pytest.raises(LoptError, match="record 3: missing column 'output'"):
        to_reference_text({"instruction": "x"}, where="record 3", fmt="alpaca")
    with pytest.raises(LoptError, match="field 'input' must be text"):
        to_reference_text({"instruction": "x", "input": 7, "output": "y"})


# --- tokenization and masking ----------------------------------------------------------------


def test_chatml_labels_only_the_answer_and_its_eos(chatml, caplog):
    with caplog.at_level(logging.WARNING):
        (example,), stats = tokenize_sft([qa()], chatml, max_seq_length=512)
    assert not caplog.records  # the prefix property holds for ChatML: no fallback
    messages = to_messages(qa())
    # The input is exactly the rendered conversation: nothing lost, EOS not doubled.
    assert chatml.decode(example["input_ids"]) == chatml.apply_chat_template(messages, tokenize=False)
    assert labelled_spans(chatml, example) == ["The answer is 4.<|im_end|>"]
    prompt_ids = chatml(build_prompt(chatml, messages), add_special_tokens=False)["input_ids"]
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert set(example["labels"][: len(prompt_ids)]) == {IGNORE_INDEX}
    assert example["labels"][-1] == IGNORE_INDEX  # ChatML's "\n" after <|im_end|> is not trained
    assert stats == {
        "examples": 1,
        "truncated": 0,
        "skipped_truncated": 0,
        "tokens": len(example["input_ids"]),
        "trained_tokens": sum(label != IGNORE_INDEX for label in example["labels"]),
    }


def test_multi_turn_trains_every_assistant_turn(chatml):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    (example,), _ = tokenize_sft([record], chatml, max_seq_length=512)
    assert labelled_spans(chatml, example) == ["Hi!<|im_end|>", "4<|im_end|>"]
    assert chatml.decode(example["input_ids"]) == chatml.apply_chat_template(record["messages"], tokenize=False)


def test_eos_appended_once_when_the_template_does_not_end_with_it(bpe):
    tokenizer = make_tokenizer(bpe, chat_template=CHATML, eos_token="</s>")
    (example,), _ = tokenize_sft([qa()], tokenizer, max_seq_length=512)
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert example["input_ids"].count(tokenizer.eos_token_id) == 1
    assert labelled_spans(tokenizer, example)[-1].endswith("<|im_end|>\n</s>")


def test_plain_template_without_chat_template(plain):
    (example,), _ = tokenize_sft([qa()], plain, max_seq_length=512)
    prompt = build_prompt(plain, to_messages(qa()))
    assert prompt == "### User:\nWhat is 2 + 2?\n\n### Assistant:\n"
    assert plain.decode(example["input_ids"]).startswith(prompt)
    assert labelled_spans(plain, example) == ["The answer is 4.<|im_end|>"]
    assert example["input_ids"].count(plain.eos_token_id) == 1


def test_plain_template_system_prefix(plain):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert build_prompt(plain, messages) == "### System:\nS\n\n### User:\nU\n\n### Assistant:\n"


def test_template_without_prefix_property_trains_the_final_turn(bpe, caplog):
    # Renders the number of messages up front, so a conversation's start is not a prefix of it.
    template = "{{ messages | length }}" + CHATML
    tokenizer = make_tokenizer(bpe, chat_template=template)
    record = {
        "messages": [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    with caplog.at_level(logging.WARNING):
        (example,), _ = tokenize_sft([record], tokenizer, max_seq_length=512)
    assert "only their final assistant turn is trained" in caplog.text
    assert labelled_spans(tokenizer, example) == ["4<|im_end|>"]
    assert tokenizer.decode(example["input_ids"]).startswith(build_prompt(tokenizer, record["messages"]))


def test_truncation_skips_examples_without_trained_tokens(chatml):
    records = [qa(), qa(question="What is 2 + 2? " * 40)]
    prompt_length = len(chatml(build_prompt(chatml, to_messages(qa())), add_special_tokens=False)["input_ids"])
    examples, stats = tokenize_sft(records, chatml, max_seq_length=prompt_length + 2)
    assert stats["examples"] == 1 and stats["skipped_truncated"] == 1
    assert stats["truncated"] == 1  # the kept example lost the end of its answer; the skipped one is not counted
    assert len(examples[0]["input_ids"]) == prompt_length + 2
    assert stats["trained_tokens"] == 2 and stats["tokens"] == prompt_length + 2
    _, untruncated = tokenize_sft(records[:1], chatml, max_seq_length=4096)
    assert untruncated["truncated"] == 0 and untruncated["skipped_truncated"] == 0


def test_all_examples_truncated_is_an_error(chatml):
    with pytest.raises(
        LoptError, match=r"all 2 examples were truncated away.*--max_seq_length 8.*raise --max_seq_length"
    ):
        tokenize_sft([qa(), qa()], chatml, max_seq_length=8)


@pytest.mark.parametrize("tokenizer_name", ["chatml", "plain"])
def test_reference_prompt_format_trains_the_plain_text_output_and_eos(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    records = [
        {"instruction": "What is 2 + 2?", "input": "", "output": "The answer is 4."},
        {"instruction": "What is 2 + 2?", "input": "Hello there", "output": "4"},
    ]
    (first, second), stats = tokenize_sft(records, tokenizer, max_seq_length=512, prompt_format="reference")
    prompt = "Instruction: What is 2 + 2?\nResponse:\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("The answer is 4.", add_special_tokens=False)["input_ids"]
    # No chat template, no BOS: the prompt's tokens, then the output's, then EOS.
    assert first["input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert first["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(second["input_ids"]) == "Instruction: What is 2 + 2?\nHello there\nResponse:\n4<|im_end|>"
    assert labelled_spans(tokenizer, second) == ["4<|im_end|>"]
    assert (
        stats["trained_tokens"] == len(answer_ids) + 1 + len(tokenizer("4", add_special_tokens=False)["input_ids"]) + 1
    )


def test_reference_prompt_format_of_prompt_completion_and_other_shapes(chatml):
    (plain_text,), _ = tokenize_sft(
        [{"prompt": "What is 2 + 2?", "completion": " 4"}], chatml, max_seq_length=512, prompt_format="reference"
    )
    assert chatml.decode(plain_text["input_ids"]) == "What is 2 + 2? 4<|im_end|>"
    assert labelled_spans(chatml, plain_text) == [" 4<|im_end|>"]
    # Shapes the reference has no plain text for are tokenized exactly as with the chat format.
    for record in (qa(), {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "completion": "4"}):
        reference, _ = tokenize_sft([record], chatml, max_seq_length=512, prompt_format="reference")
        assert reference == tokenize_sft([record], chatml, max_seq_length=512)[0]


def test_unknown_prompt_format_suggests_the_closest(chatml):
    with pytest.raises(LoptError, match=r"unknown --prompt_format 'refrence'\. Did you mean 'reference'\?"):
        tokenize_sft([qa()], chatml, max_seq_length=64, prompt_format="refrence")


def test_detects_the_shape_once_and_names_the_bad_record(chatml):
    with pytest.raises(LoptError, match="record 1: missing column 'answer'"):
        tokenize_sft([qa(), {"question": "q", "solution": "s"}], chatml, max_seq_length=64)


def test_build_prompt_drops_the_final_answer(chatml):
    messages = to_messages(qa())
    assert build_prompt(chatml, messages) == build_prompt(chatml, messages[:-1])
    assert build_prompt(chatml, messages).endswith(
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_collate_pads_right_and_masks():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = collate(examples, pad_token_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        k: (2, 3) for k in ("input_ids", "attention_mask", "labels")
    }
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(v.dtype == torch.long for v in batch.values())


# --- sources: files ----------------------------------------------------------------------------

RECORDS = [qa("q1", "a1"), qa("q2", "a2"), qa("q3", "a3")]


def test_json_list_wrapper_and_json_lines_content(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(RECORDS, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": RECORDS}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in RECORDS))
    for name in ("list.json", "wrapped.json", "lines.json"):
        assert load_records(train_file=tmp_path / name) == RECORDS, name


def test_jsonl_skips_blank_lines_and_max_samples_keeps_the_first(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n  \n" + json.dumps(RECORDS[2]) + "\n")
    assert load_records(train_file=path) == RECORDS
    assert load_records(train_file=str(path), max_samples=2) == RECORDS[:2]


MANY = [qa(f"q{n}", f"a{n}") for n in range(20)]


def test_random_select_samples_is_a_seeded_subset_of_a_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MANY))
    picked = load_records(train_file=path, max_samples=5, select_samples="random", seed=1)
    assert picked == load_records(train_file=path, max_samples=5, select_samples="random", seed=1)  # reproducible
    assert len(picked) == 5 and all(r in MANY for r in picked) and len({r["question"] for r in picked}) == 5
    assert picked != MANY[:5] and picked != load_records(
        train_file=path, max_samples=5, select_samples="random", seed=2
    )
    assert load_records(train_file=path, max_samples=5, select_samples="first", seed=1) == MANY[:5]
    assert load_records(train_file=path, select_samples="random") == MANY  # no --max_samples: every record
    with pytest.raises(LoptError, match=r"unknown --select_samples 'randm'\. Did you mean 'random'\?"):
        load_records(train_file=path, max_samples=5, select_samples="randm")


def test_preference_records_select_samples_random_from_a_file(tmp_path):
    pairs = [{"prompt": f"p{n}", "chosen": f"c{n}", "rejected": f"r{n}"} for n in range(20)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    picked = preference_records(train_file=path, max_samples=5, select_samples="random", seed=4)
    assert picked == load_records(train_file=path, max_samples=5, select_samples="random", seed=4)
    assert picked != pairs[:5] and preference_records(train_file=path, max_samples=5) == pairs[:5]


def test_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert load_records(train_file=path) == RECORDS


def test_csv_rows_are_text_records(tmp_path):
    path = tmp_path / "train.csv"
    # a BOM as spreadsheet programs write it, a quoted cell with a comma and a line break, a number, a blank line
    path.write_text('\ufeffquestion,answer\n"Add 2, then 2?","Step 1\n#### 4"\n\nq2,42\n', encoding="utf-8", newline="")
    assert load_records(train_file=path) == [qa("Add 2, then 2?", "Step 1\n#### 4"), qa("q2", "42")]
    assert load_records(train_file=path, max_samples=1) == [qa("Add 2, then 2?", "Step 1\n#### 4")]
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\np,c,r\n")
    assert preference_records(train_file=tmp_path / "pairs.csv") == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


def test_csv_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("question,answer\nq1,a1\nq2,a2,extra\n")
    with pytest.raises(LoptError, match=rf"{path}:3: 3 cells, but the header has 2 columns; quote cells"):
        load_records(train_file=path)
    path.write_text("question,answer\nq1\n")
    with pytest.raises(LoptError, match=rf"{path}:2: 1 cells, but the header has 2 columns"):
        load_records(train_file=path)
    path.write_text("question,answer,question\nq,a,q\n")
    with pytest.raises(LoptError, match=rf"{path}:1: column 'question' appears more than once"):
        load_records(train_file=path)
    for empty in ("", "question,answer\n"):
        path.write_text(empty)
        with pytest.raises(LoptError, match=rf"--train_file {path} gave no records; check that it holds data"):
            load_records(train_file=path)
    path.write_text("text,label\nhello,1\n")  # columns of no accepted shape: formats.py names them
    with pytest.raises(LoptError, match="cannot tell the record shape from the columns found: label, text"):
        detect_format(load_records(train_file=path)[0])


def test_csv_conversations_are_refused_with_a_hint(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}]"\n')
    (record,) = load_records(train_file=path)
    with pytest.raises(LoptError, match="got str; a CSV cell holds only text: keep conversations in .jsonl"):
        to_messages(record, where="record 0")


def test_saved_dataset_folders_and_the_split_of_a_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(tmp_path / "saved")
    assert load_records(train_file=tmp_path / "saved") == RECORDS
    assert load_records(train_file=str(tmp_path / "saved"), max_samples=2) == RECORDS[:2]
    splits = {"train": datasets.Dataset.from_list(RECORDS[:2]), "test": datasets.Dataset.from_list(RECORDS[2:])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dict")
    assert load_records(train_file=tmp_path / "dict") == RECORDS[:2]  # --split's default: train
    assert load_records(train_file=tmp_path / "dict", split="test") == RECORDS[2:]
    with pytest.raises(LoptError, match=r"unknown --split of .*dict 'tests'\. Did you mean 'test'\?.*train, test"):
        load_records(train_file=tmp_path / "dict", split="tests")


def test_folders_that_are_not_saved_datasets(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(LoptError, match=r"is a directory without a saved dataset \(no state.json or dataset_dict.json"):
        load_records(train_file=tmp_path / "plain")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    with pytest.raises(LoptError, match=rf"--train_file {broken}: not a readable saved dataset"):
        load_records(train_file=broken)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n{oops\n")
    with pytest.raises(LoptError, match=rf"{path}:3: invalid JSON \("):
        load_records(train_file=path)


def test_malformed_json_document_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"question": "q", "answer": "a"},\n  {"question": }\n]')
    with pytest.raises(LoptError, match=rf"{path}:3: invalid JSON"):
        load_records(train_file=path)


def test_file_errors(tmp_path, monkeypatch):
    with pytest.raises(LoptError, match="no such file"):
        load_records(train_file=tmp_path / "missing.jsonl")
    with pytest.raises(LoptError, match="is a directory"):
        load_records(train_file=tmp_path)
    (tmp_path / "train.txt").write_text("question,answer\n")
    with pytest.raises(
        LoptError,
        match=r"unsupported file type '.txt'; supported: .json, .jsonl, .parquet, .csv or a folder saved with "
        r"Dataset.save_to_disk",
    ):
        load_records(train_file=tmp_path / "train.txt")
    (tmp_path / "locked.jsonl").write_text("{}")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)  # chmod does not stop root, which tests may run as
    with pytest.raises(LoptError, match="locked.jsonl: permission denied"):
        load_records(train_file=tmp_path / "locked.jsonl")


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "bad.parquet").write_text("hello")
    with pytest.raises(LoptError, match="not a readable parquet file"):
        load_records(train_file=tmp_path / "bad.parquet")


def test_empty_sources_are_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]))
    with pytest.raises(LoptError, match=rf"--train_file {path} gave no records after --max_samples 0"):
        load_records(train_file=path, max_samples=0)
    path.write_text("\n\n")
    with pytest.raises(LoptError, match=rf"--train_file {path} gave no records; check that it holds data"):
        load_records(train_file=path)


def test_no_source_and_negative_max_samples():
    with pytest.raises(LoptError, match="no data source given"):
        load_records()
    with pytest.raises(LoptError, match="--max_samples must be 0 or more"):
        load_records(preset="gsm-symbolic", max_samples=-1)
    with pytest.raises(LoptError, match="--dataset_preset gsm-symbolic gave no records after --max_samples 0"):
        load_records(preset="gsm-symbolic", max_samples=0)


# --- sources: presets and the hub -------------------------------------------------------------


def test_unknown_preset_suggests_the_closest_and_lists_all():
    with pytest.raises(LoptError) as error:
        load_records(preset="gsm-symbolc")
    assert "Did you mean 'gsm-symbolic'?" in str(error.value)
    assert all(name in str(error.value) for name in PRESETS)


def test_gsm_symbolic_records():
    records = load_records(preset="gsm-symbolic", max_samples=20, seed=0)
    assert len(records) == 20
    for record in records:
        assert set(record) == {"question", "answer"}
        assert record["question"].endswith("\n" + GSM_ANSWER_INSTRUCTION)
        last_line = record["answer"].splitlines()[-1]
        assert last_line.startswith("#### ") and record["answer"].count("####") == 1
        float(last_line.removeprefix("#### "))  # a number
    assert load_records(preset="gsm-symbolic", max_samples=20, seed=0) == records  # deterministic
    other = load_records(preset="gsm-symbolic", max_samples=20, seed=1)
    assert [r["question"] for r in other] != [r["question"] for r in records]
    assert detect_format(records[0]) == "question_answer"


def test_gsm_symbolic_answer_line_uses_the_canonical_answer(monkeypatch):
    # reasoning-gym writes some solutions as "#### 8.0" while the answer is "8".
    import reasoning_gym

    item = {"question": "Q?", "answer": "8", "metadata": {"answer_cot": "4+4=8\n#### 8.0"}}
    monkeypatch.setattr(reasoning_gym, "create_dataset", lambda name, size, seed: [item])
    assert generated.gsm_symbolic_records(1, 0) == [
        {"question": f"Q?\n{GSM_ANSWER_INSTRUCTION}", "answer": "4+4=8\n#### 8"}
    ]


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset with one that records its calls and returns a small Dataset."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"instruction": f"i{n}", "input": "", "output": f"o{n}"} for n in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("preset", ["alpaca", "metamathqa", "tulu3"])
def test_hub_presets_call_load_dataset_with_their_id(fake_hub, preset):
    records = load_records(preset=preset, max_samples=3)
    assert fake_hub == [(PRESETS[preset].hub_id, None, "train")]
    assert records == [{"instruction": f"i{n}", "input": "", "output": f"o{n}"} for n in range(3)]


def test_random_select_samples_shuffles_a_hub_dataset_with_the_seed(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: datasets.Dataset.from_list(MANY))
    picked = load_records(dataset_name="x/y", max_samples=5, select_samples="random", seed=3)
    assert picked == load_records(dataset_name="x/y", max_samples=5, select_samples="random", seed=3)
    assert len(picked) == 5 and all(r in MANY for r in picked) and len({r["question"] for r in picked}) == 5
    assert picked != MANY[:5] and picked != load_records(dataset_name="x/y", max_samples=5, select_samples="random")
    assert load_records(preset="alpaca", max_samples=5, select_samples="random", seed=3) == picked  # presets too
    assert load_records(dataset_name="x/y", max_samples=5) == MANY[:5]


def test_generated_gsm_symbolic_is_the_same_under_either_select_samples():
    first = load_records(preset="gsm-symbolic", max_samples=3, seed=5)
    assert load_records(preset="gsm-symbolic", max_samples=3, seed=5, select_samples="random") == first


def test_preset_hub_ids():
    assert {n: p.hub_id for n, p in PRESETS.items()} == {
        "gsm-symbolic": None,
        "aiw": None,
        "chain-sum": None,
        "alpaca": "tatsu-lab/alpaca",
        "metamathqa": "meta-math/MetaMathQA",
        "tulu3": "allenai/tulu-3-sft-mixture",
    }


def test_short_answer_presets_train_on_the_answer_alone_asked_as_their_task_asks():
    # aiw's questions carry lopt's one-number instruction; chain-sum's own prompt already says how to answer
    aiw, chain_sum = load_records(preset="aiw", max_samples=3, seed=1), load_records(preset="chain-sum", max_samples=3)
    assert all(r["question"].endswith(ANSWER_INSTRUCTIONS["number"]) and r["answer"].isdigit() for r in aiw)
    assert all(r["question"].endswith("=") and r["answer"].lstrip("-").isdigit() for r in chain_sum)


def test_dataset_name_passes_config_and_split(fake_hub):
    load_records(dataset_name="openai/gsm8k", dataset_config="main", split="test")
    assert fake_hub == [("openai/gsm8k", "main", "test")]


def test_train_file_wins_over_dataset_name_and_preset(fake_hub, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]))
    assert load_records(train_file=path, dataset_name="x/y", preset="alpaca") == RECORDS[:1]
    assert fake_hub == []
    load_records(dataset_name="x/y", preset="alpaca")
    assert fake_hub == [("x/y", None, "train")]


def test_unreachable_hub_suggests_offline_sources(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'tatsu-lab/alpaca' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LoptError) as error:
        load_records(preset="alpaca")
    message = str(error.value)
    assert "'tatsu-lab/alpaca' could not be loaded from the Hugging Face hub" in message
    assert "--dataset_preset gsm-symbolic" in message and "--train_file" in message
    assert "Couldn't reach" in message  # the cause is kept


def test_gsm_symbolic_tokenizes_end_to_end(chatml):
    examples, stats = tokenize_sft(load_records(preset="gsm-symbolic", max_samples=4), chatml, max_seq_length=4096)
    assert stats["examples"] == 4 and stats["skipped_truncated"] == 0
    assert all(labelled_spans(chatml, e)[0].endswith("<|im_end|>") for e in examples)
