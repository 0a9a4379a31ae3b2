"""`lopt data preview`: a run's first examples as the model sees them, and counts over all of its data.

Nothing here prepares data its own way: each recipe's records go through the functions the recipe itself calls
(SFT: its record loading and `tokenize_sft`; DPO: `preference_records` and TRL's DPOTrainer preparation; GRPO:
`grpo_records` and `prepare_prompts`), with the flags parsed by the recipe's own config. Only the tokenizer is
loaded, not the weights, so a preview of a run takes seconds.
"""

from __future__ import annotations

import argparse
import importlib
import types
from itertools import groupby
from pathlib import Path

from rich.console import Console
from rich.text import Text

from lopt.config import DPOConfig, GRPOConfig, SFTConfig, parse_config
from lopt.data.collate import IGNORE_INDEX, build_prompt
from lopt.errors import LoptError, unknown_choice
from lopt.output import phase, plural
from lopt.recipes.registry import RECIPES

DATA_COMMANDS = {"preview": "the first examples as the model sees them, and counts over the whole data set"}
DEFAULT_NUM_EXAMPLES = 3
# Around trained tokens where the output is not a terminal (a file, a pipe), which shows no styles.
TRAINED_MARKS = ("⟦", "⟧")
PROMPT_STYLE, TRAINED_STYLE, REJECTED_STYLE, HEADER_STYLE = "dim", "bold green", "bold red", "bold cyan"
# parse_config insists on --output_dir, which a preview never writes to; one given is accepted and unused.
_UNUSED_OUTPUT_DIR = "(lopt data preview writes nothing)"

USAGE = """usage: lopt data preview [--recipe sft|dpo|grpo] [--num_examples N] [the recipe's flags]

Shows the first N examples (default 3) as the recipe trains on them: after the chat template or
prompt format and tokenization, the prompt dim and the trained tokens bold green (between ⟦ ⟧ when
the output is not a terminal), with their token counts; then counts over the whole data set:
examples, those truncated to the maximum length and those dropped. It takes the recipe's data and
model flags (--train_file, --dataset_name, --dataset_preset, --task, --max_samples, --split,
--model_name_or_path, --max_seq_length, --max_prompt_length, --prompt_format, --config, ...: see
`lopt data preview --recipe sft --help`); it loads only the tokenizer and writes nothing."""


def main(argv: list[str]) -> None:
    """`lopt data <command> [flags]`."""
    if not argv or argv[0] in ("-h", "--help"):
        if argv:
            print(USAGE)
            return
        raise LoptError(f"name what to do with the data:\n{USAGE}")
    if argv[0] not in DATA_COMMANDS:
        raise unknown_choice("`lopt data` command", argv[0], DATA_COMMANDS)
    preview_main(argv[1:])


def preview_main(argv: list[str]) -> None:
    """`lopt data preview`: its own two flags, then the recipe's flags parsed by the recipe's config."""
    own = argparse.ArgumentParser(prog="lopt data preview", add_help=False, allow_abbrev=False)
    own.add_argument("--recipe", default="sft")
    own.add_argument("--num_examples", type=int, default=DEFAULT_NUM_EXAMPLES)
    options, rest = own.parse_known_args(argv)
    previewed = {name: recipe for name, recipe in RECIPES.items() if recipe.preview}
    if options.recipe not in previewed:
        raise unknown_choice("--recipe", options.recipe, list(previewed))
    if options.num_examples < 0:
        raise LoptError(f"--num_examples must be 0 or more (0: the counts only), got {options.num_examples}")
    recipe = previewed[options.recipe]
    config = parse_config(
        [*rest, "--output_dir", _UNUSED_OUTPUT_DIR],
        recipe.config,
        prog=f"lopt data preview --recipe {options.recipe}",
        description=f"The data of `lopt {options.recipe}` as the model sees it (also: --num_examples N, default "
        f"{DEFAULT_NUM_EXAMPLES}). Takes these flags of the recipe; only the data and model ones matter.",
    )
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    module, function = recipe.preview.split(":")
    preview = getattr(importlib.import_module(module), function)
    shown, summary = preview(config, tokenizer, options.num_examples)
    # The preview is the command's result: stdout, so that it pipes into a pager or a file.
    out = Console(soft_wrap=True, highlight=False, emoji=False)
    marks = not out.is_terminal
    for example in shown:
        out.print(example.text(marks))
        out.print()
    out.print(Text(f"the whole data set, as lopt {options.recipe} would train on it", style=HEADER_STYLE))
    for line in summary:
        out.print(line)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer a run of `--model_name_or_path` uses (an alias, a folder, a hub id or a LoRA adapter folder),
    resolved as the model registry resolves it, without loading the weights."""
    from transformers import AutoTokenizer

    from lopt.models.lora import adapter_base_model, is_adapter_folder
    from lopt.models.registry import ALIASES, DEFAULT_MODEL, resolve_model

    folder = Path(name_or_path).expanduser()
    if is_adapter_folder(name_or_path):  # as the registry loads one: its own tokenizer, else its base model's
        has_own = (folder / "tokenizer_config.json").is_file()
        source = str(folder) if has_own else resolve_model(adapter_base_model(folder))
    else:
        source = resolve_model(name_or_path)
    with phase(f"loading the tokenizer of {name_or_path!r}") as loading:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        # OSError: not on the hub, gated, or the hub is unreachable and it is not cached; ValueError: no tokenizer
        # files in the folder (transformers then tries to convert a slow tokenizer that is not there either).
        except (OSError, ValueError) as error:
            described = repr(name_or_path) if source == name_or_path else f"{name_or_path!r} ({source})"
            raise LoptError(
                f"cannot load the tokenizer of --model_name_or_path {described}: {error}\n"
                f"Pass a model folder with its tokenizer files, a hub id you can reach, or an alias "
                f"({', '.join(ALIASES)}); offline, '{DEFAULT_MODEL}' always works."
            ) from error
        loading.result = f"{len(tokenizer):,} tokens, {'a' if tokenizer.chat_template else 'no'} chat template"
    return tokenizer


# ---- rendering ------------------------------------------------------------------------------------


class _Marked:
    """An example's header and pieces (text, style, trained): styled, with marks around the trained text where the
    output shows no styles."""

    def __init__(self, header: Text):
        self.header, self.pieces = header, []

    def add(self, text: str, style: str, trained: bool) -> None:
        self.pieces.append((text, style, trained))

    def text(self, marks: bool) -> Text:
        text = self.header.copy()
        text.append("\n")
        for piece, style, trained in self.pieces:
            text.append(f"{TRAINED_MARKS[0]}{piece}{TRAINED_MARKS[1]}" if trained and marks else piece, style=style)
        text.rstrip()  # the template's last newline would only add a blank line
        return text


def _header(title: str, counts: str, note: str = "") -> Text:
    return Text.assemble((title, HEADER_STYLE), f"  {counts}", (f"  {note}" if note else "", "yellow"))


def _add_runs(example: _Marked, tokenizer, ids: list[int], trained: list[bool], style: str) -> None:
    """Consecutive tokens of the same kind decoded together, so the text reads as the tokenizer renders it."""
    for is_trained, run in groupby(zip(ids, trained, strict=True), key=lambda pair: pair[1]):
        text = tokenizer.decode([token for token, _ in run])
        example.add(text, style if is_trained else PROMPT_STYLE, is_trained)


def _mean(values: list[int]) -> str:
    return f"{sum(values) / len(values):,.1f}" if values else "-"


# ---- SFT ------------------------------------------------------------------------------------------


def preview_sft(config: SFTConfig, tokenizer, num_examples: int) -> tuple[list[_Marked], list[str]]:
    """The examples `lopt sft` trains on: its records, tokenized by `tokenize_sft` with the run's flags."""
    from lopt.data.collate import pack_examples, packing_summary, tokenize_sft
    from lopt.data.presets import sft_records  # the recipe's own choice among --train_file, --dataset_name, presets

    records = sft_records(config)
    with phase("tokenizing the training data"):
        examples, stats = tokenize_sft(records, tokenizer, config.max_seq_length, config.prompt_format)
    shown = []
    for index, example in enumerate(examples[:num_examples]):
        trained = [label != IGNORE_INDEX for label in example["labels"]]
        total, n_trained = len(trained), sum(trained)
        note = f"reaches --max_seq_length {config.max_seq_length}" if total == config.max_seq_length else ""
        counts = f"prompt {total - n_trained} · trained {n_trained} · total {total} tokens"
        marked = _Marked(_header(f"example {index + 1} of {stats['examples']}", counts, note))
        _add_runs(marked, tokenizer, example["input_ids"], trained, TRAINED_STYLE)
        shown.append(marked)
    lengths = [len(example["input_ids"]) for example in examples]
    share = stats["trained_tokens"] / stats["tokens"]
    summary = [
        f"{plural(len(records), 'record')} -> {plural(stats['examples'], 'example')} ({stats['skipped_truncated']:,} "
        f"skipped: response truncated away); {stats['truncated']:,} truncated to --max_seq_length "
        f"{config.max_seq_length}",
        f"{stats['tokens']:,} tokens, {stats['trained_tokens']:,} trained ({share:.1%}); per example: mean "
        f"{_mean(lengths)}, longest {max(lengths):,}; --prompt_format {config.prompt_format}",
    ]
    if config.packing:  # the examples above are shown one by one; training sees them in these rows
        rows = len(pack_examples(examples, config.max_seq_length))
        summary.append(f"--packing: {packing_summary(rows, stats['tokens'], config.max_seq_length)}")
    return shown, summary


# ---- DPO ------------------------------------------------------------------------------------------


def preview_dpo(config: DPOConfig, tokenizer, num_examples: int) -> tuple[list[_Marked], list[str]]:
    """The pairs `lopt dpo` trains on: `preference_records`, tokenized and filtered by TRL's DPOTrainer preparation."""
    import datasets
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from lopt.data.presets import preference_records, source_options
    from lopt.recipes.trl.arguments import trl_arguments

    records = preference_records(config.dataset_preset, **source_options(config))
    args = trl_arguments(
        TRLDPOConfig, config, beta=config.beta, loss_type=config.loss_type, max_length=config.max_seq_length
    )
    with phase("tokenizing the preference pairs"):
        try:
            # TRL tokenizes and filters the pairs inside its trainer; its own method runs here with the tokenizer,
            # the only trainer state it reads, so no model is loaded.
            pairs = DPOTrainer._prepare_dataset(
                types.SimpleNamespace(_tokenizer=tokenizer), datasets.Dataset.from_list(records), tokenizer, args,
                "train",
            )  # fmt: skip
        except (ValueError, KeyError, TypeError) as error:
            raise LoptError(f"TRL's DPOTrainer could not prepare these pairs: {error}") from error
    prompts, chosen, rejected = (list(pairs[column]) for column in ("prompt_ids", "chosen_ids", "rejected_ids"))
    limit = config.max_seq_length
    longest = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    shown = []
    for index in range(min(num_examples, len(pairs))):
        p, c, r = prompts[index], chosen[index], rejected[index]
        note = f"cut at --max_seq_length {limit}" if longest[index] > limit else ""
        counts = f"prompt {len(p)} · chosen {len(c)} · rejected {len(r)} tokens"
        marked = _Marked(_header(f"pair {index + 1} of {len(pairs)}", counts, note))
        _add_runs(marked, tokenizer, p, [False] * len(p), TRAINED_STYLE)
        marked.add("\nchosen: ", HEADER_STYLE, False)
        _add_runs(marked, tokenizer, c, [True] * len(c), TRAINED_STYLE)
        marked.add("\nrejected: ", HEADER_STYLE, False)
        _add_runs(marked, tokenizer, r, [True] * len(r), REJECTED_STYLE)
        shown.append(marked)
    dropped, truncated = len(records) - len(pairs), sum(n > limit for n in longest)
    summary = [
        f"{plural(len(records), 'pair')} -> {len(pairs):,} kept ({dropped:,} dropped: the prompt alone fills "
        f"--max_seq_length {limit}); {truncated:,} truncated to --max_seq_length {limit}",
        f"tokens per pair, mean: prompt {_mean([len(p) for p in prompts])}, chosen {_mean([len(c) for c in chosen])}, "
        f"rejected {_mean([len(r) for r in rejected])}; longest prompt + answer {max(longest, default=0):,}",
    ]
    return shown, summary


# ---- GRPO -----------------------------------------------------------------------------------------


def preview_grpo(config: GRPOConfig, tokenizer, num_examples: int) -> tuple[list[_Marked], list[str]]:
    """The prompts `lopt grpo` samples completions for: `grpo_records`, then `prepare_prompts` with the run's flags."""
    from lopt.data.presets import grpo_records, source_options
    from lopt.recipes.grpo import prepare_prompts

    records = grpo_records(config.task, **source_options(config))
    kept = prepare_prompts(records, tokenizer, config.max_prompt_length)
    # prepare_prompts leaves conversations for TRL to render with the chat template, as build_prompt does.
    texts = [r["prompt"] if isinstance(r["prompt"], str) else build_prompt(tokenizer, r["prompt"]) for r in kept]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    shown = []
    for index in range(min(num_examples, len(kept))):
        prompt_ids = ids[index]
        counts = f"prompt {len(prompt_ids)} tokens · gold answer {kept[index]['answer']}"
        marked = _Marked(_header(f"prompt {index + 1} of {len(kept)}", counts))
        _add_runs(marked, tokenizer, prompt_ids, [False] * len(prompt_ids), TRAINED_STYLE)
        shown.append(marked)
    lengths = [len(prompt_ids) for prompt_ids in ids]
    dropped = len(records) - len(kept)
    summary = [
        f"{plural(len(records), 'prompt')} with a final answer -> {len(kept):,} kept ({dropped:,} dropped: longer "
        f"than --max_prompt_length {config.max_prompt_length}); --task {config.task}",
        f"prompt tokens: mean {_mean(lengths)}, longest {max(lengths):,}; trained: the {config.num_generations} "
        f"completions sampled per prompt, up to --max_completion_length {config.max_completion_length} tokens each",
    ]
    return shown, summary
