"""`lopt generate` and `lopt chat`: try a saved model, on a batch of prompts or in a conversation.

The first thing after training is to ask the model something. Both commands load whatever the other
commands load (an alias, a run's folder, a hub id) through the model registry, write the prompt the
way lopt trained it (`build_prompt`: the tokenizer's chat template, or lopt's plain format for a
tokenizer without one, which is what `lopt sft` trains such a model on and `lopt eval` asks it with),
and share the sampling flags: greedy unless --do_sample. `generate` writes one JSON object per prompt
for scripts; `chat` keeps the conversation and streams each answer as it is generated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from lopt.data.collate import build_prompt
from lopt.data.sources import parse_jsonl
from lopt.errors import LoptError
from lopt.models.registry import load_model_and_tokenizer
from lopt.output import LOG_LEVELS, console

CHAT_PROMPT = "> "


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags both commands take: the model, the system message, sampling, loading."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("model", metavar="MODEL", help="a saved model folder, an alias (e.g. smollm2-135m) or a hub id")
    parser.add_argument("--system", help="a system message before the conversation")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="answer length limit (default: 256)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="with --do_sample: softmax temperature (default: 1.0)")
    parser.add_argument("--top_p", type=float, help="with --do_sample: nucleus sampling mass (default: 1.0)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampling (default: 42)")
    parser.add_argument("--trust_remote_code", action="store_true", help="run the model's own code from the hub")
    parser.add_argument(
        "--log_level", default="info", choices=LOG_LEVELS,
        help="info: lopt's phases, libraries quiet; debug: also every library's bars and logs (default: info)",
    )  # fmt: skip
    return parser


def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise LoptError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}.")
    shaping = [flag for flag in ("temperature", "top_p") if getattr(args, flag) is not None]
    if shaping and not args.do_sample:
        flags = " and ".join(f"--{flag}" for flag in shaping)
        raise LoptError(f"{flags} only change sampling; add --do_sample (decoding is greedy without it).")
    if args.temperature is not None and args.temperature <= 0:
        raise LoptError(f"--temperature must be > 0, got {args.temperature}; drop --do_sample for greedy decoding.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise LoptError(f"--top_p must be in (0, 1], got {args.top_p}.")


def load(args: argparse.Namespace):
    """The model on the GPU if there is one (bfloat16 where supported), else on the CPU in float32, and its
    tokenizer; the sampling flags are checked first, so that a wrong one fails before a long load."""
    _check_sampling(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=dtype, trust_remote_code=args.trust_remote_code, device=device, what="MODEL"
    )
    torch.manual_seed(args.seed)
    return model, tokenizer


def note_plain_format(model_name: str, tokenizer, hint: str = "") -> None:
    """Say once that a tokenizer without a chat template gets lopt's plain format."""
    if not tokenizer.chat_template:
        console.print(
            f"{model_name}: its tokenizer has no chat template; prompts are written in lopt's plain format "
            f"(### User: ... ### Assistant:), the one lopt sft trains such a model on{hint}",
            highlight=False,
        )


def _stop_ids(model, tokenizer) -> list[int]:
    """The model's end-of-turn tokens (a generation config may list several) and the tokenizer's eos."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [] if configured is None else [configured]
    return sorted({*ids, tokenizer.eos_token_id} - {None})


def generation_options(args: argparse.Namespace, model, tokenizer) -> dict:
    """`model.generate` keyword arguments for the sampling flags."""
    options = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": _stop_ids(model, tokenizer),
    }
    if args.do_sample:
        options.update(temperature=args.temperature or 1.0, top_p=args.top_p or 1.0)
    return options


def _messages(system: str | None, *turns: dict) -> list[dict]:
    return [*([{"role": "system", "content": system}] if system else []), *turns]


# lopt generate


@torch.no_grad()
def complete(model, tokenizer, texts: list[str], *, raw: bool, batch_size: int, options: dict) -> list[tuple[str, int]]:
    """(completion, generated tokens) for each prompt text, in batches padded on the left, so that every row
    starts generating at once. A prompt from `build_prompt` holds its BOS already; `raw` text gets the
    tokenizer's special tokens added, as a plain `tokenizer(text)` would."""
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stops, results = set(options["eos_token_id"]), []
    try:
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=raw).to(model.device)
            output = model.generate(**inputs, **options)
            for row in output[:, inputs["input_ids"].shape[1] :].tolist():
                length = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))  # then padding
                results.append((tokenizer.decode(row[:length], skip_special_tokens=True), length))
    finally:
        tokenizer.padding_side = padding_side
    return results


def read_prompts(path: Path) -> list[str]:
    """One prompt a line, or for a .jsonl file one object a line with a "prompt" string."""
    if not path.is_file():
        raise LoptError(f"--prompts_file {path}: no such file. Pass a text file (one prompt a line) or a .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoptError(f"--prompts_file {path}: not UTF-8 text ({error}); save it as UTF-8.") from None
    if path.suffix.lower() != ".jsonl":
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for number, record in enumerate(parse_jsonl(text, path), start=1):
            if not isinstance(record.get("prompt"), str):
                raise LoptError(
                    f'--prompts_file {path}: record {number} has no "prompt" string (keys: {", ".join(record)}). '
                    'Write one object a line, e.g. {"prompt": "What is 2 + 2?"}.'
                )
            prompts.append(record["prompt"])
    if not prompts:
        raise LoptError(
            f"--prompts_file {path} holds no prompts. Write one prompt a line"
            + (', each a JSON object with a "prompt" key.' if path.suffix.lower() == ".jsonl" else ".")
        )
    return prompts


def generate_main(argv: list[str]) -> None:
    parser = _parser("lopt generate", "Completions of a model for a batch of prompts, as JSON Lines.")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    given.add_argument("--prompts_file", type=Path, help='one prompt a line, or .jsonl with a "prompt" key a line')
    parser.add_argument("--no_chat_template", action="store_true", help="send the prompts as raw text")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts generated at once (default: 8)")
    parser.add_argument("--output", type=Path, help="write the JSON Lines to this file instead of stdout")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        raise LoptError("no prompt: pass --prompt TEXT (once per prompt) or --prompts_file FILE.")
    if args.batch_size < 1:
        raise LoptError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.output and not args.output.parent.is_dir():  # before the generation, not after it
        raise LoptError(f"--output {args.output}: folder {args.output.parent} does not exist; create it first.")
    prompts = args.prompt or read_prompts(args.prompts_file)
    model, tokenizer = load(args)
    if args.no_chat_template:
        texts = prompts
    else:
        note_plain_format(args.model, tokenizer, "; --no_chat_template sends the prompts as raw text")
        texts = [build_prompt(tokenizer, _messages(args.system, {"role": "user", "content": p})) for p in prompts]
    options = generation_options(args, model, tokenizer)
    results = complete(model, tokenizer, texts, raw=args.no_chat_template, batch_size=args.batch_size, options=options)
    lines = "".join(
        json.dumps({"prompt": prompt, "completion": completion, "generated_tokens": length}, ensure_ascii=False) + "\n"
        for prompt, (completion, length) in zip(prompts, results, strict=True)
    )
    if args.output:
        args.output.write_text(lines, encoding="utf-8")
        console.print(f"wrote {len(results)} completions to {args.output}", highlight=False)
    else:
        sys.stdout.write(lines)


# lopt chat


class _Echo(TextStreamer):
    """Prints the answer as it is generated and keeps it: all of it, or what was shown before Ctrl-C."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        super().on_finalized_text(text, stream_end)


def _answer(model, tokenizer, messages: list[dict], options: dict) -> str:
    """Stream the model's next turn to stdout; Ctrl-C stops it and keeps what was shown."""
    streamer = _Echo(tokenizer)
    try:
        inputs = tokenizer(build_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            model.generate(**inputs.to(model.device), **options, streamer=streamer)
    except KeyboardInterrupt:
        print(flush=True)
        console.print("(stopped)", highlight=False)
    return streamer.text.strip()


def chat_main(argv: list[str]) -> None:
    parser = _parser("lopt chat", "Talk to a model in the terminal; its answers are streamed as they are generated.")
    args = parser.parse_args(argv)
    import readline  # noqa: F401  (line editing and history for input())

    model, tokenizer = load(args)
    note_plain_format(args.model, tokenizer)
    options = generation_options(args, model, tokenizer)
    console.print("/reset starts a new conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer", highlight=False)
    messages = _messages(args.system)
    while True:
        try:
            line = input(CHAT_PROMPT).strip()
        except EOFError:  # Ctrl-D
            print()
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            print()
            continue
        if line == "/exit":
            return
        if line == "/reset":
            messages = _messages(args.system)
            console.print("(new conversation)", highlight=False)
        elif line:
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": _answer(model, tokenizer, messages, options)})
