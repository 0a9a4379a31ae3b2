"""The `lopt` command. Subcommands map one-to-one onto recipes."""

from __future__ import annotations

import functools
import importlib
import sys

from lopt.errors import LoptError, unknown_choice
from lopt.output import log_level_from, quiet_libraries

USAGE = """usage: lopt <command> [flags]

commands:
  sft       supervised fine-tuning, --method lopt (local learning, default) or e2e
  grpo      GRPO with verifiable rewards or a reward model on TRL's GRPOTrainer, --method lopt or e2e
  rloo      RLOO, the same rewards, on TRL's RLOOTrainer, --method lopt or e2e
  dpo       DPO on preference pairs on TRL's DPOTrainer, --method lopt or e2e
  rm        a reward model on preference pairs on TRL's RewardTrainer, --method lopt or e2e
  eval      task accuracy, retention (perplexity vs the starting model) and lm-eval benchmarks of saved models
  report    tables and plots comparing runs, from their training_args.json, metrics.jsonl and eval.json
  demo      the E2E / LoPT / LoRA study on the embedded SmolLM2-135M: train, evaluate, report
  bench     activation memory and step time of E2E vs LoPT (local and joint backward)
  watch     the live dashboard of runs from their folders (metrics.jsonl, completions.jsonl), side by side
  generate  completions of a model for prompts (flags or a file), one JSON object per prompt
  chat      talk to a model in the terminal, its answers streamed as they are generated
  merge     fold a LoRA adapter folder into its base model and save a plain checkpoint
  push      upload a model folder (full model or LoRA adapter) to the Hugging Face hub, with lopt's model card
  data      `lopt data preview`: a run's first examples as the model sees them, and counts over its data

`lopt <command> --help` lists a command's flags."""


# The LoPT reference implementation's script names, kept at the repository root: they run these
# commands with the reference's defaults (cosine schedule, 3% warm-up, a seeded random --max_samples
# subset, and its plain-text prompts for SFT) where `lopt sft` / `lopt grpo` keep lopt's own.
REFERENCE_SCRIPTS = {"sft": "train_sft.py", "grpo": "train_grpo.py"}
REFERENCE_DEFAULTS = ", with the LoPT reference implementation's defaults"


def _listeners(config) -> list:
    """The listeners the command line adds to a run: the dashboard, with --tui (or LOPT_TUI=1) on a terminal."""
    from lopt.dashboard import Dashboard, tui_enabled

    return [Dashboard()] if tui_enabled(config.tui, sys.stderr) else []


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"  # None: a resumed run had no step left


def _sft(argv: list[str], reference: bool = False) -> None:
    from lopt.config import ReferenceSFTConfig, SFTConfig, parse_config

    cls, prog = (ReferenceSFTConfig, REFERENCE_SCRIPTS["sft"]) if reference else (SFTConfig, "lopt sft")
    description = f"Supervised fine-tuning (E2E or LoPT){REFERENCE_DEFAULTS if reference else ''}."
    config = parse_config(argv, cls, prog=prog, description=description)
    from lopt.tools.publish import check_push_flags  # after parsing: --help does without it

    check_push_flags(config)  # the repository id, offline mode and a token, before hours of training
    # Imported once the flags are parsed: the recipe imports torch and transformers (seconds), which --help
    # and a wrong flag do without.
    from lopt.output import console, plural
    from lopt.parallel.distributed import is_main_process
    from lopt.recipes.sft import run_sft

    result = run_sft(config, callbacks=_listeners(config))
    if is_main_process():
        console.print(
            f"done: {plural(result.steps, 'step')} in {result.elapsed_s:.1f} s, task loss "
            f"{_loss(result.first_loss)} -> {_loss(result.last_loss)}; model saved to {result.output_dir}"
        )


def _grpo(argv: list[str], reference: bool = False, rloo: bool = False) -> None:
    from lopt.config import GRPOConfig, ReferenceGRPOConfig, RLOOConfig, parse_config

    if rloo:
        cls, prog, description = RLOOConfig, "lopt rloo", "RLOO (E2E or LoPT) on verifiable rewards or a reward model."
    else:
        cls, prog = (ReferenceGRPOConfig, REFERENCE_SCRIPTS["grpo"]) if reference else (GRPOConfig, "lopt grpo")
        description = (
            f"GRPO (E2E or LoPT) on verifiable rewards or a reward model{REFERENCE_DEFAULTS if reference else ''}."
        )
    config = parse_config(argv, cls, prog=prog, description=description)
    from lopt.tools.publish import check_push_flags  # after parsing: --help does without it

    check_push_flags(config)  # the repository id, offline mode and a token, before hours of training
    from lopt.output import console, plural  # after parsing, as in _sft
    from lopt.parallel.distributed import is_main_process
    from lopt.recipes.grpo import run_grpo

    result = run_grpo(config, callbacks=_listeners(config))
    if not is_main_process():
        return
    rewards = " -> ".join(f"{m['reward']:.3f}" for m in result.metrics)
    console.print(
        f"done: {plural(result.steps, 'step')} in {result.elapsed_s:.1f} s, mean reward per logged step {rewards}; "
        f"model saved to {result.output_dir}"
    )


def _dpo(argv: list[str]) -> None:
    from lopt.config import DPOConfig, parse_config

    config = parse_config(argv, DPOConfig, prog="lopt dpo", description="DPO on preference pairs (E2E or LoPT).")
    from lopt.tools.publish import check_push_flags  # after parsing: --help does without it

    check_push_flags(config)  # the repository id, offline mode and a token, before hours of training
    from lopt.output import console, plural  # after parsing, as in _sft
    from lopt.parallel.distributed import is_main_process
    from lopt.recipes.dpo import run_dpo

    result = run_dpo(config, callbacks=_listeners(config))
    if not is_main_process():
        return
    losses = [m["task_loss"] for m in result.metrics]
    console.print(
        f"done: {plural(result.steps, 'step')} in {result.elapsed_s:.1f} s, DPO loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f}; model saved to {result.output_dir}"
    )


def _rm(argv: list[str]) -> None:
    from lopt.config import RMConfig, parse_config

    description = "A reward model on preference pairs (E2E or LoPT): one score per answer, Bradley-Terry loss."
    config = parse_config(argv, RMConfig, prog="lopt rm", description=description)
    from lopt.tools.publish import check_push_flags  # after parsing: --help does without it

    check_push_flags(config)  # the repository id, offline mode and a token, before hours of training
    from lopt.output import console, plural  # after parsing, as in _sft
    from lopt.parallel.distributed import is_main_process
    from lopt.recipes.rm import run_rm

    result = run_rm(config, callbacks=_listeners(config))
    if not is_main_process():
        return
    accuracy = " -> ".join(f"{m['reward_accuracy']:.2f}" for m in result.metrics)
    console.print(
        f"done: {plural(result.steps, 'step')} in {result.elapsed_s:.1f} s, pairwise accuracy per logged step "
        f"{accuracy}; reward model saved to {result.output_dir}"
    )


# The commands that are a tool's own `main(argv)`, as "module:function": imported only when run, so that
# `lopt <command>` imports nothing it does not use (and --help stays fast).
TOOL_COMMANDS = {
    "eval": "lopt.evaluation.cli:main",
    "report": "lopt.tools.report:main",
    "demo": "lopt.tools.demo:main",
    "watch": "lopt.dashboard.watch:main",
    "bench": "lopt.tools.bench:main",
    "generate": "lopt.tools.generate:generate_main",
    "chat": "lopt.tools.generate:chat_main",
    "merge": "lopt.tools.merge:main",
    "push": "lopt.tools.publish:main",
    "data": "lopt.tools.preview:main",
}


def _tool(target: str):
    """The command that imports `target` ("module:function") when it runs, and calls it with the flags."""

    def run(argv: list[str]) -> None:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(argv)

    return run


LOADS_MODELS = {"sft", "grpo", "rloo", "dpo", "rm", "eval", "demo", "bench", "generate", "chat", "merge", "data"}
COMMANDS = {
    "sft": _sft,
    "grpo": _grpo,
    "rloo": functools.partial(_grpo, rloo=True),
    "dpo": _dpo,
    "rm": _rm,
    **{name: _tool(target) for name, target in TOOL_COMMANDS.items()},
}


def main(argv: list[str] | None = None, *, reference: bool = False) -> int:
    """Run `lopt <command> [flags]`; `reference`: run sft or grpo as the reference implementation's script
    (train_sft.py, train_grpo.py), with the reference's defaults."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a command is required: say which there are, and fail as argparse does
        print(f"lopt: name a command\n\n{USAGE}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lopt: {unknown_choice('command', command, list(COMMANDS))}\n\n{USAGE}", file=sys.stderr)
        return 2
    if reference and command not in REFERENCE_SCRIPTS:
        raise ValueError(f"no reference script runs `lopt {command}`; only {' and '.join(REFERENCE_SCRIPTS)} have one")
    name = REFERENCE_SCRIPTS[command] if reference else f"lopt {command}"
    # The others import no model library, so start at once; nor does --help, and quieting imports torch.
    if command in LOADS_MODELS and not {"-h", "--help"} & set(rest):
        quiet_libraries(log_level_from(rest))
    try:
        if reference:
            COMMANDS[command](rest, reference=True)
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
