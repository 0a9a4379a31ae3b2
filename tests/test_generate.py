"""`lopt generate` and `lopt chat` on a tiny model built here: JSON Lines out, greedy results equal to
`model.generate`'s (batched or not), prompts from files, flag errors, seeded sampling, adapter folders,
and the interactive chat in a real terminal (tmux)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopt.cli import main
from lopt.data.collate import build_prompt
from lopt.models.lora import add_lora
from terminal import Terminal
from tiny_models import tiny_model_dir

PROMPTS = ["What is 2 + 2?", "Hello there, who are you?", "hi", "solve the problem: 3 + 4"]
MAX_NEW = 16
LORA = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")


def talkative_model_dir(folder: Path, seed: int = 3) -> Path:
    """The tiny llama of tiny_models with larger random weights, so its greedy answer depends on the prompt
    (at the default init it answers every prompt with the same newlines), and an untied LM head that can
    only pick printable ASCII tokens or the eos token (a terminal shows the answer as it is), the eos row
    scaled up so that some answers end before --max_new_tokens and a batch holds rows of different lengths."""
    tiny_model_dir(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
        head = model.get_input_embeddings().weight.clone()
        for token in range(head.shape[0]):
            text = tokenizer.decode([token])
            if token in tokenizer.all_special_ids or not (text.isascii() and text.isprintable()):
                head[token] = 0
        head[tokenizer.eos_token_id] = 3 * model.get_input_embeddings().weight[tokenizer.eos_token_id]
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On a shared 2-core CPU, two OpenMP threads spinning against other processes make generation many
    times slower; the tiny model needs one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return talkative_model_dir(tmp_path_factory.mktemp("generate") / "model")


def direct(model, tokenizer, text: str, raw: bool = False, max_new_tokens: int = MAX_NEW) -> tuple[str, int]:
    """Greedy (completion, generated tokens) of `model.generate` itself on one prompt text, without padding."""
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=raw)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def chat_text(tokenizer, *turns: str, system: str | None = None) -> str:
    """build_prompt over alternating user / assistant turns (the last one a user's)."""
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": turn} for i, turn in enumerate(turns)]
    return build_prompt(tokenizer, ([{"role": "system", "content": system}] if system else []) + messages)


def generate(capsys, *args: str) -> list[dict]:
    assert main(["generate", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def prompt_flags(prompts: list[str]) -> list[str]:
    return [flag for prompt in prompts for flag in ("--prompt", prompt)]


def test_generate_writes_one_json_line_per_prompt_with_the_greedy_completion_of_model_generate(model_dir, capsys):
    flags = [str(model_dir), *prompt_flags(PROMPTS[:2]), "--max_new_tokens", str(MAX_NEW)]
    rows = generate(capsys, *flags)
    assert [row["prompt"] for row in rows] == PROMPTS[:2]
    assert all(isinstance(row["completion"], str) and 1 <= row["generated_tokens"] <= MAX_NEW for row in rows)
    assert set(rows[0]) == {"prompt", "completion", "generated_tokens"}
    assert generate(capsys, *flags) == rows  # greedy: the same again

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    expected = [direct(model, tokenizer, chat_text(tokenizer, prompt)) for prompt in PROMPTS[:2]]
    assert [(row["completion"], row["generated_tokens"]) for row in rows] == expected
    assert rows[0]["completion"] != rows[1]["completion"]  # the answer depends on the prompt


def test_left_padded_batches_give_the_greedy_results_of_one_prompt_at_a_time(model_dir, capsys):
    flags = [str(model_dir), *prompt_flags(PROMPTS), "--max_new_tokens", str(MAX_NEW)]
    one = generate(capsys, *flags, "--batch_size", "1")
    two = generate(capsys, *flags, "--batch_size", "2")
    four = generate(capsys, *flags, "--batch_size", "4")
    assert one == two == four
    lengths = [row["generated_tokens"] for row in one]
    assert min(lengths) < MAX_NEW and len(set(lengths)) > 1  # rows that stop early sit in a batch with longer ones

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    expected = [direct(model, tokenizer, chat_text(tokenizer, prompt)) for prompt in PROMPTS]
    assert [(row["completion"], row["generated_tokens"]) for row in four] == expected


def test_a_system_message_goes_into_the_prompt_as_the_chat_template_writes_it(model_dir, capsys):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    system = "You are terse."
    flags = [str(model_dir), *prompt_flags(PROMPTS[:2]), "--max_new_tokens", str(MAX_NEW), "--system", system]
    rows = generate(capsys, *flags)
    expected = [direct(model, tokenizer, chat_text(tokenizer, prompt, system=system)) for prompt in PROMPTS[:2]]
    assert [(row["completion"], row["generated_tokens"]) for row in rows] == expected


@pytest.fixture(scope="module")
def plain_model_dir(model_dir, tmp_path_factory) -> Path:
    """The same model with a tokenizer that has no chat template and adds a BOS token, as Llama's does."""
    folder = tmp_path_factory.mktemp("plain") / "model"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("chat_template.jinja"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = "<|im_start|>"
    tokenizer.chat_template, tokenizer.bos_token = None, bos
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    )
    tokenizer.save_pretrained(folder)
    return folder


def test_without_a_chat_template_prompts_get_the_plain_format_and_raw_prompts_the_tokenizers_bos(
    plain_model_dir, capsys
):
    model = AutoModelForCausalLM.from_pretrained(plain_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(plain_model_dir)
    assert not tokenizer.chat_template and tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    flags = [str(plain_model_dir), *prompt_flags(PROMPTS[:2]), "--max_new_tokens", str(MAX_NEW), "--batch_size", "2"]

    assert main(["generate", *flags]) == 0
    captured = capsys.readouterr()
    assert "has no chat template" in captured.err and "--no_chat_template" in captured.err
    rows = [json.loads(line) for line in captured.out.splitlines()]
    texts = [chat_text(tokenizer, prompt) for prompt in PROMPTS[:2]]
    assert all(text.startswith(tokenizer.bos_token + "### User:\n") for text in texts)  # BOS written once, in the text
    expected = [direct(model, tokenizer, text) for text in texts]
    assert [(row["completion"], row["generated_tokens"]) for row in rows] == expected

    rows = generate(capsys, *flags, "--no_chat_template")  # the text as it is, plus what the tokenizer adds
    expected = [direct(model, tokenizer, prompt, raw=True) for prompt in PROMPTS[:2]]
    assert [(row["completion"], row["generated_tokens"]) for row in rows] == expected


def test_prompts_files_as_text_or_jsonl_and_output_to_a_file(model_dir, tmp_path, capsys):
    reference = generate(capsys, str(model_dir), *prompt_flags(PROMPTS[:3]), "--max_new_tokens", str(MAX_NEW))

    text = tmp_path / "prompts.txt"
    text.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n   \n{PROMPTS[2]}\n", encoding="utf-8")  # blank lines skipped
    assert generate(capsys, str(model_dir), "--prompts_file", str(text), "--max_new_tokens", str(MAX_NEW)) == reference

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS[:3])))
    out = tmp_path / "completions.jsonl"
    flags = ["--prompts_file", str(jsonl), "--output", str(out), "--batch_size", "2", "--max_new_tokens", str(MAX_NEW)]
    assert main(["generate", str(model_dir), *flags]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # the lines went to the file
    assert f"wrote 3 completions to {out}" in captured.err
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == reference


@pytest.mark.parametrize(
    ("flags", "file_text", "said"),
    [
        ([], None, ["no prompt", "--prompt", "--prompts_file"]),
        (["--prompts_file", "{tmp}/missing.txt"], None, ["--prompts_file", "missing.txt", "no such file"]),
        (["--prompts_file", "{tmp}/p.jsonl"], '{"prompt": "a"}\n\n{"question": "b"}\n', ["--prompts_file", "record 2"]),
        (["--prompts_file", "{tmp}/p.jsonl"], "\n", ["--prompts_file", "no prompts"]),
        (["--prompt", "a", "--temperature", "0.7"], None, ["--temperature", "--do_sample"]),
        (["--prompt", "a", "--do_sample", "--top_p", "1.5"], None, ["--top_p"]),
        (["--prompt", "a", "--batch_size", "0"], None, ["--batch_size", "got 0"]),
        (["--prompt", "a", "--max_new_tokens", "0"], None, ["--max_new_tokens"]),
        (["--prompt", "a", "--output", "{tmp}/no/such/out.jsonl"], None, ["--output", "does not exist"]),
        (["--prompts_file", "{tmp}/p.jsonl"], b'{"prompt": "caf\xe9"}\n', ["--prompts_file", "not UTF-8"]),
    ],
    ids=[
        "no-prompt",
        "missing-file",
        "record-without-prompt",
        "empty-file",
        "temperature",
        "top_p",
        "batch",
        "max_new",
        "output-folder",
        "not-utf8",
    ],
)
def test_wrong_flags_exit_2_with_a_message_naming_the_flag(model_dir, tmp_path, capsys, flags, file_text, said):
    if isinstance(file_text, bytes):
        (tmp_path / "p.jsonl").write_bytes(file_text)
    elif file_text is not None:
        (tmp_path / "p.jsonl").write_text(file_text)
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    assert main(["generate", str(model_dir), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("lopt generate: error: ")
    assert all(word in captured.err for word in said), captured.err


def test_prompt_and_prompts_file_are_exclusive(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", str(model_dir), "--prompt", "a", "--prompts_file", str(tmp_path / "p.txt")])
    assert exited.value.code == 2
    assert "--prompts_file" in capsys.readouterr().err


def test_sampling_is_reproducible_for_a_seed(model_dir, capsys):
    flags = [str(model_dir), *prompt_flags(PROMPTS[:2]), "--max_new_tokens", str(MAX_NEW), "--do_sample"]
    first = generate(capsys, *flags, "--seed", "7", "--temperature", "1.5", "--top_p", "0.95")
    assert generate(capsys, *flags, "--seed", "7", "--temperature", "1.5", "--top_p", "0.95") == first
    assert generate(capsys, *flags, "--seed", "8", "--temperature", "1.5", "--top_p", "0.95") != first
    greedy = generate(capsys, *flags[:-1])
    assert first != greedy  # --do_sample samples
    assert all(1 <= row["generated_tokens"] <= MAX_NEW for row in first)


def test_an_adapter_folder_generates_what_the_merged_model_does(model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    adapted = add_lora(AutoModelForCausalLM.from_pretrained(model_dir), LORA)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing
                param.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    adapted.save_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == model_dir and not (adapter / "config.json").exists()

    flags = [*prompt_flags(PROMPTS[:2]), "--max_new_tokens", str(MAX_NEW)]
    rows = generate(capsys, str(adapter), *flags)
    merged = adapted.merge_and_unload().eval()
    expected = [direct(merged, tokenizer, chat_text(tokenizer, prompt)) for prompt in PROMPTS[:2]]
    assert [(row["completion"], row["generated_tokens"]) for row in rows] == expected
    assert rows != generate(capsys, str(model_dir), *flags)  # the adapter is applied, not just the base


def _wait_for_prompt(terminal: Terminal, prompts: int, seconds: float = 30.0) -> list[str]:
    """The screen's lines once it shows `prompts` chat prompts ("> ..." lines), the last an empty one."""
    lines: list[str] = []
    for _ in range(int(seconds * 10)):
        lines = terminal.screen().rstrip().splitlines()
        if sum(line.startswith(">") for line in lines) == prompts and lines[-1] == ">":
            return lines
        time.sleep(0.1)
    raise AssertionError(f"the chat prompt #{prompts} never appeared:\n" + "\n".join(lines))


def test_chat_in_a_real_terminal_answers_keeps_the_conversation_resets_and_quits(model_dir):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: it provides the real terminal")
    max_new = 8
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    first, _ = direct(model, tokenizer, chat_text(tokenizer, "hi"), max_new_tokens=max_new)
    second, _ = direct(model, tokenizer, chat_text(tokenizer, "hi", first.strip(), "hi"), max_new_tokens=max_new)
    assert first.strip() and first.strip() != second.strip()  # the history changes the answer

    terminal = Terminal("chat")
    try:
        command = f"OMP_NUM_THREADS=1 {sys.executable} -m lopt.cli chat {model_dir} --max_new_tokens {max_new}"
        terminal.type(f"{command}; echo chat-exit-$?")
        terminal.type("Enter")
        lines = _wait_for_prompt(terminal, 1, seconds=60)  # Python, torch and the model start first
        assert any("/reset starts a new conversation" in line for line in lines)

        terminal.type("-l", "hi")  # -l: the text as typed, not key names
        terminal.type("Enter")
        lines = _wait_for_prompt(terminal, 2)
        assert [line.strip() for line in lines[-3:]] == ["> hi", first.strip(), ">"], lines  # answer, new prompt

        terminal.type("-l", "hi")
        terminal.type("Enter")
        lines = _wait_for_prompt(terminal, 3)
        assert lines[-2].strip() == second.strip(), lines  # the answer of a conversation that holds the first turn

        terminal.type("-l", "/reset")
        terminal.type("Enter")
        lines = _wait_for_prompt(terminal, 4)
        assert lines[-2] == "(new conversation)", lines

        terminal.type("-l", "hi")
        terminal.type("Enter")
        lines = _wait_for_prompt(terminal, 5)
        assert lines[-2].strip() == first.strip(), lines  # a fresh conversation answers as the first did

        terminal.type("-l", "/exit")
        terminal.type("Enter")
        shown = terminal.wait_for("chat-exit-0", seconds=15)
        assert shown.rstrip().splitlines()[-1] == "ready$"

        terminal.type("clear", "Enter")  # again, for Ctrl-C at the prompt (drops the line) and Ctrl-D (quits)
        terminal.wait_for("ready$")
        terminal.type(f"{command}; echo chat-again-exit-$?")
        terminal.type("Enter")
        _wait_for_prompt(terminal, 1, seconds=60)
        terminal.type("-l", "a line given up")
        terminal.type("C-c")
        lines = _wait_for_prompt(terminal, 2)
        assert lines[-2].strip() == "> a line given up", lines  # no answer: the line was dropped
        terminal.type("C-d")
        shown = terminal.wait_for("chat-again-exit-0", seconds=15)
        assert shown.rstrip().splitlines()[-1] == "ready$"
    finally:
        terminal.close()


def test_a_missing_model_is_named_as_the_model_argument(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "MODEL" in err and "no such folder" in err and "--model_name_or_path" not in err
