"""`lopt data preview` on a tiny saved model: what it marks as trained, and its counts against the recipes'."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer

from lopt.cli import main
from lopt.data.collate import IGNORE_INDEX, build_prompt, tokenize_sft
from lopt.data.generated import gsm_symbolic_pairs
from lopt.data.presets import grpo_records, load_records
from lopt.tools.preview import TRAINED_MARKS
from test_data import labelled_spans
from tiny_data import SFT_RECORDS, sft_args

# At sft_args' --max_seq_length 64 (a short question's prompt is 36 tokens): an answer cut short, and a question
# so long that no answer token is left (the example is skipped).
LONG_ANSWER = {"instruction": "What is 1 + 1?", "input": "", "output": "The answer is 2. " * 6}
LONG_QUESTION = {"instruction": "What is 1 + 1? " * 8, "input": "", "output": "2"}
MARKED = re.compile(f"{TRAINED_MARKS[0]}(.*?){TRAINED_MARKS[1]}", re.S)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture()
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [LONG_ANSWER, *SFT_RECORDS[:4], LONG_QUESTION, *SFT_RECORDS[4:]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preview(capsys, *flags) -> str:
    code = main(["data", "preview", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_sft_preview_marks_exactly_the_trained_tokens(model_dir, tokenizer, train_file, tmp_path, capsys):
    out = preview(capsys, *sft_args(model_dir, train_file, tmp_path / "run"), "--num_examples", "100")
    examples, stats = tokenize_sft(load_records(train_file=train_file), tokenizer, 64)
    assert stats["truncated"] == 1 and stats["skipped_truncated"] == 1  # the data exercises both
    headers = re.findall(r"example (\d+) of (\d+)  prompt (\d+) · trained (\d+) · total (\d+) tokens", out)
    assert len(headers) == len(examples) == stats["examples"]
    blocks = re.split(r"^example \d+ of \d+  .*\n", out, flags=re.M)[1:]
    for header, block, example in zip(headers, blocks, examples, strict=True):
        n_trained = sum(label != IGNORE_INDEX for label in example["labels"])
        total = len(example["input_ids"])
        assert [int(n) for n in header[2:]] == [total - n_trained, n_trained, total]
        shown = block.split("\n\n")[0]
        assert MARKED.findall(shown) == labelled_spans(tokenizer, example)
        # without the marks, the text is the whole sequence the model reads
        unmarked = shown.replace(TRAINED_MARKS[0], "").replace(TRAINED_MARKS[1], "")
        assert unmarked == tokenizer.decode(example["input_ids"]).rstrip()
    assert "reaches --max_seq_length 64" in out  # the cut example
    assert not (tmp_path / "run").exists()  # a preview writes nothing, --output_dir or not


def test_sft_preview_counts_what_the_recipe_reports(model_dir, train_file, tmp_path, capsys):
    args = sft_args(model_dir, train_file, tmp_path / "run")
    out = preview(capsys, *args, "--num_examples", "0")
    assert "example 1" not in out
    summary = re.search(
        r"(\d+) records -> (\d+) examples \((\d+) skipped: response truncated away\); (\d+) truncated to "
        r"--max_seq_length 64\n(\d+) tokens, (\d+) trained",
        out,
    )
    assert summary is not None, out
    records, examples, skipped, truncated, tokens, trained = map(int, summary.groups())
    assert (records, skipped, truncated) == (len(SFT_RECORDS) + 2, 1, 1)
    assert main(["sft", *args, "--max_steps", "1"]) == 0
    err = capsys.readouterr().err
    assert f"{examples} examples, {trained} trained tokens of {tokens}, {skipped} skipped" in err
    assert f"| {examples} examples ({skipped} skipped: response truncated away) |" in err


def test_styles_on_a_terminal_instead_of_marks(model_dir, train_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then writes as to a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = preview(
        capsys, "--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--num_examples", "1"
    )
    assert TRAINED_MARKS[0] not in out
    assert "\x1b[1;32mThe answer is" in out  # bold green


def test_dpo_preview_counts_the_pairs_trl_drops(model_dir, tokenizer, capsys):
    limit = 300
    out = preview(
        capsys, "--recipe", "dpo", "--model_name_or_path", str(model_dir), "--max_samples", "6",
        "--max_seq_length", str(limit), "--num_examples", "1",
    )  # fmt: skip
    pairs = gsm_symbolic_pairs(6, 42)  # the preset with --max_samples 6 and the default --seed
    prompt_lengths = [
        len(tokenizer(build_prompt(tokenizer, p["prompt"]), add_special_tokens=False).input_ids) for p in pairs
    ]
    dropped = sum(n >= limit for n in prompt_lengths)  # TRL keeps a pair only if its prompt leaves room for an answer
    assert 0 < dropped < len(pairs)
    assert f"6 pairs -> {len(pairs) - dropped} kept ({dropped} dropped: the prompt alone fills --max_seq_length" in out
    first = next(p for p, n in zip(pairs, prompt_lengths, strict=True) if n < limit)
    chosen, rejected = MARKED.findall(out)
    assert chosen == first["chosen"][0]["content"] + "<|im_end|>\n"
    assert rejected == first["rejected"][0]["content"] + "<|im_end|>\n"
    assert re.search(rf"pair 1 of {len(pairs) - dropped}  prompt {prompt_lengths[pairs.index(first)]} · chosen", out)


def test_grpo_preview_shows_the_prompts_kept_by_max_prompt_length(model_dir, tokenizer, capsys):
    limit = 290
    out = preview(
        capsys, "--recipe", "grpo", "--model_name_or_path", str(model_dir), "--max_samples", "4",
        "--max_prompt_length", str(limit), "--num_examples", "1",
    )  # fmt: skip
    records = grpo_records("gsm-symbolic", max_samples=4, seed=42)
    prompts = [build_prompt(tokenizer, r["prompt"]) for r in records]
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    kept = [i for i, n in enumerate(lengths) if n <= limit]
    assert 0 < len(kept) < len(records)
    assert f"4 prompts with a final answer -> {len(kept)} kept ({4 - len(kept)} dropped" in out
    first = kept[0]
    assert f"prompt 1 of {len(kept)}  prompt {lengths[first]} tokens · gold answer {records[first]['answer']}" in out
    assert prompts[first].rstrip() in out
    assert TRAINED_MARKS[0] not in out  # GRPO trains on sampled completions, none of the prompt


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data"], "name what to do with the data"),
        (["data", "previw"], "unknown `lopt data` command 'previw'. Did you mean 'preview'?"),
        (["data", "preview", "--recipe", "ppo"], "unknown --recipe 'ppo'. Did you mean 'dpo'?"),
        (["data", "preview", "--num_examples", "-1"], "--num_examples must be 0 or more"),
    ],
)
def test_bad_commands_and_flags(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_tokenizer_files(model_dir, tmp_path, capsys):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    assert main(["data", "preview", "--model_name_or_path", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"lopt data: error: cannot load the tokenizer of --model_name_or_path '{folder}'" in err
    assert "Pass a model folder with its tokenizer files" in err
