"""The `lopt` command: each training subcommand is a record of the recipe registry, each other one a tool's `main`."""

from __future__ import annotations

import functools
import importlib
import sys

from lopt.config import parse_config
from lopt.errors import LoptError, unknown_choice
from lopt.output import log_level_from, quiet_libraries
from lopt.recipes.registry import RECIPES, Recipe

# The commands that are a tool's own `main(argv)`, as "module:function": imported only when run, so that
# `lopt <command>` imports nothing it does not use (and --help stays fast). The training commands are the recipe
# registry's (lopt/recipes/registry.py).
TOOL_COMMANDS = {
    "eval": (
        "lopt.evaluation.cli:main",
        "task accuracy, retention (perplexity vs the starting model) and lm-eval benchmarks of saved models",
    ),
    "report": (
        "lopt.tools.report:main",
        "tables and plots comparing runs, from their training_args.json, metrics.jsonl and eval.json",
    ),
    "demo": (
        "lopt.study.demo:main",
        "the E2E / LoPT / LoRA study on the embedded SmolLM2-135M: train, evaluate, report",
    ),
    "bench": ("lopt.tools.bench:main", "activation memory and step time of E2E vs LoPT (local and joint backward)"),
    "watch": (
        "lopt.dashboard.watch:main",
        "the live dashboard of runs from their folders (metrics.jsonl, completions.jsonl), side by side",
    ),
    "generate": (
        "lopt.tools.generate:generate_main",
        "completions of a model for prompts (flags or a file), one JSON object per prompt",
    ),
    "chat": (
        "lopt.tools.generate:chat_main",
        "talk to a model in the terminal, its answers streamed as they are generated",
    ),
    "merge": ("lopt.tools.merge:main", "fold a LoRA adapter folder into its base model and save a plain checkpoint"),
    "push": (
        "lopt.tools.publish:main",
        "upload a model folder (full model or LoRA adapter) to the Hugging Face hub, with lopt's model card",
    ),
    "data": (
        "lopt.tools.preview:main",
        "`lopt data preview`: a run's first examples as the model sees them, and counts over its data",
    ),
}
# Tools that load a model or its tokenizer: their library logs are quieted before they import them.
TOOLS_LOADING_MODELS = {"eval", "demo", "bench", "generate", "chat", "merge", "data"}
# Said after a reference script's description: it runs `lopt <recipe>` with the reference implementation's
# defaults (cosine schedule, 3% warm-up, a seeded random --max_samples subset, its plain-text prompts for SFT).
REFERENCE_DEFAULTS = ", with the LoPT reference implementation's defaults"


def usage() -> str:
    """`lopt --help`: every command, the registry's recipes first."""
    lines = [f"  {name:<9} {recipe.summary}, --method lopt or e2e" for name, recipe in RECIPES.items()]
    lines += [f"  {name:<9} {what}" for name, (_, what) in TOOL_COMMANDS.items()]
    return (
        "usage: lopt <command> [flags]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`lopt <command> --help` lists a command's flags."
    )


def _listeners(config) -> list:
    """The listeners the command line adds to a run: the publisher (model card, --push_to_hub; it checks the hub
    flags now, before anything loads) and the dashboard, with --tui (or LOPT_TUI=1) on a terminal."""
    from lopt.dashboard import Dashboard, tui_enabled
    from lopt.tools.publish import Publisher

    return [Publisher(config)] + ([Dashboard()] if tui_enabled(config.tui, sys.stderr) else [])


def train(recipe: Recipe, argv: list[str], reference: bool = False) -> None:
    """`lopt <recipe> [flags]`: parse the flags into the recipe's config, run it with the CLI's listeners, and say
    how it went; `reference`: as the recipe's reference-implementation script, with the reference's defaults."""
    cls, prog = (
        (recipe.reference_config, recipe.reference_script) if reference else (recipe.config, f"lopt {recipe.name}")
    )
    description = recipe.description + (REFERENCE_DEFAULTS if reference else "") + "."
    config = parse_config(argv, cls, prog=prog, description=description)
    listeners = _listeners(config)
    # Imported once the flags are parsed: the recipe imports torch and transformers (seconds), which --help and a
    # wrong flag do without.
    from lopt.output import console
    from lopt.parallel.distributed import is_main_process

    result = recipe.load_run()(config, callbacks=listeners)
    if is_main_process():
        console.print(recipe.end_line(result))


def _tool(target: str):
    """The command that imports `target` ("module:function") when it runs, and calls it with the flags."""

    def run(argv: list[str]) -> None:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(argv)

    return run


COMMANDS = {
    **{name: functools.partial(train, recipe) for name, recipe in RECIPES.items()},
    **{name: _tool(target) for name, (target, _) in TOOL_COMMANDS.items()},
}
LOADS_MODELS = {*RECIPES, *TOOLS_LOADING_MODELS}
REFERENCE_SCRIPTS = {name: recipe.reference_script for name, recipe in RECIPES.items() if recipe.reference_script}


def main(argv: list[str] | None = None, *, reference: bool = False) -> int:
    """Run `lopt <command> [flags]`; `reference`: run sft or grpo as the reference implementation's script
    (train_sft.py, train_grpo.py), with the reference's defaults."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a command is required: say which there are, and fail as argparse does
        print(f"lopt: name a command\n\n{usage()}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lopt: {unknown_choice('command', command, list(COMMANDS))}\n\n{usage()}", file=sys.stderr)
        return 2
    if reference and command not in REFERENCE_SCRIPTS:
        raise ValueError(f"no reference script runs `lopt {command}`; only {' and '.join(REFERENCE_SCRIPTS)} have one")
    name = REFERENCE_SCRIPTS[command] if reference else f"lopt {command}"
    # The others import no model library, so start at once; nor does --help, and quieting imports torch.
    if command in LOADS_MODELS and not {"-h", "--help"} & set(rest):
        quiet_libraries(log_level_from(rest))
    try:
        if reference:
            train(RECIPES[command], rest, reference=True)
        else:
            COMMANDS[command](rest)
    except LoptError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """A command run under torchrun / accelerate launch leaves its process group before the process exits (see
    lopt.parallel.distributed.shutdown). Only a command that imported lopt's distributed module can have joined
    one: the others import no torch, and need not start to."""
    distributed = sys.modules.get("lopt.parallel.distributed")
    if distributed is not None:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
