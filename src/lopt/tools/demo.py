"""`lopt demo`: the study of whether LoPT is worth it, on the embedded SmolLM2-135M and a task it can learn on a CPU.

It trains each method on the same problems, steps, schedule and seed through the same code path as `lopt sft`,
then evaluates each saved model and the starting model on the same held-out problems: task accuracy with its 95%
interval (paired McNemar tests against E2E), and retention three ways (perplexity change on general text, the mean
per-token KL from the starting model there, accuracy on a second task no run trained on), with where in the model
each method changed it (per-layer CKA and weight change). It writes study.json, report.md / report.html with plots
(lopt/tools/study_report.py), and prints the table. Every number comes from the runs just made.

The default task is aiw ("Alice has 3 sisters and 2 brothers. How many sisters does her brother have?"): one-number
answers, so that generation is cheap; the starting model answers few of them, E2E SFT learns them within minutes
on a CPU. The default methods fit `make demo` in about 15 minutes on a 2-core CPU; --full adds the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lopt.config import SFTConfig, validate
from lopt.dashboard import Dashboard, tui_enabled
from lopt.dashboard.state import StudyRun
from lopt.data.presets import PRESETS
from lopt.evaluation.cli import EvalOptions, evaluate_model, write_eval
from lopt.models.registry import DEFAULT_MODEL
from lopt.output import console
from lopt.recipes.sft import run_sft
from lopt.tasks import EVALUABLE_TASKS
from lopt.tools.study_report import markdown_table, write_study_report
from lopt.training.memory import reset_device_peak

# name -> the SFTConfig fields that make the method; everything else is shared by all runs. LoRA trains at a higher
# learning rate, as usual practice has it (its update starts at zero and is scaled by alpha / r).
METHODS = {
    "e2e": {"method": "e2e"},
    "lopt-k2": {"method": "lopt", "num_blocks": 2},
    "lora": {"method": "e2e", "use_peft": True, "learning_rate": 1e-3},
}
# --full adds these, in the order they leave the default study when the budget is short (the order reversed).
FULL_METHODS = {
    "frozen-k2": {"method": "lopt", "num_blocks": 2, "early_blocks": "frozen"},
    "lopt-k4": {"method": "lopt", "num_blocks": 4},
    "kl-sft": {"method": "e2e", "kl_beta": 0.1},
    "lopt-k2-lora": {"method": "lopt", "num_blocks": 2, "use_peft": True, "learning_rate": 1e-3},
}
# The tasks the study can train on (an SFT preset of the same name) and score (held-out problems).
STUDY_TASKS = tuple(task for task in EVALUABLE_TASKS if task in PRESETS)
REFERENCE = "e2e"
BASE = "base"  # the folder that holds the starting model's eval.json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lopt demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="starting model: alias, folder or hub id (default: %(default)s)"
    )
    parser.add_argument(
        "--task", default="aiw", choices=STUDY_TASKS,
        help="task to train and score: an evaluable task with training data of its own (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--second_task", default="chain-sum", choices=EVALUABLE_TASKS,
        help="task no run trains on, scored for retention (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of each run (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--max_seq_length", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument(
        "--learning_rate", type=float, default=1e-4,
        help="learning rate of the full-weight runs; LoRA runs use 1e-3 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--eval_samples", type=int, default=200, help="held-out problems (default: %(default)s)")
    parser.add_argument(
        "--second_samples", type=int, default=200, help="problems of --second_task (default: %(default)s)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=16, help="answer length limit (default: %(default)s)")
    parser.add_argument(
        "--retention_windows", type=int, default=8,
        help="256-token windows of general text for perplexity, KL and CKA (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, help="seeds per method (default: 1; 2 with --full)")
    parser.add_argument(
        "--full", action="store_true",
        help=f"also train {', '.join(FULL_METHODS)}, and 2 seeds each (hours on a CPU; minutes on a GPU)",
    )  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights (GPU)")
    parser.add_argument(
        "--output_dir", default="outputs/demo",
        help="study folder: one subfolder per run, the report next to them (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=42, help="first seed; more seeds count up from it")
    parser.add_argument(
        "--tui", action=argparse.BooleanOptionalAction, default=None,
        help="full-screen live dashboard while the runs train (default: on with LOPT_TUI=1, on a terminal)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else (2 if args.full else 1)
    for flag in ("steps", "batch_size", "max_seq_length", "eval_samples", "max_new_tokens", "seeds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("second_samples", "retention_windows"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be 0 (skip) or more, got {getattr(args, flag)}")
    if args.second_task == args.task:
        parser.error(f"--second_task must differ from --task ({args.task}): it measures what the runs did not train")
    return args


def run_config(args: argparse.Namespace, folder: str, method: dict, seed: int) -> SFTConfig:
    config = SFTConfig(
        model_name_or_path=args.model,
        dataset_preset=args.task,
        max_samples=args.steps * args.batch_size,
        max_seq_length=args.max_seq_length,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_ratio=0.1,
        logging_steps=1,  # every step: the report's curves are the runs' every logged point
        save_steps=0,
        seed=seed,
        bf16=args.bf16 or None,
        output_dir=str(Path(args.output_dir) / folder),
        overwrite_output_dir=True,  # the demo's own folder; each demo run replaces the last one's files
        explicit=frozenset(method),
        **{"learning_rate": args.learning_rate, **method},  # a method's own learning rate (LoRA's) wins
    )
    validate(config)
    return config


def planned_runs(args: argparse.Namespace) -> list[dict]:
    """study.json's runs: the starting model, then each method once per seed (folder `name`, then `name-seed<S>`)."""
    methods = {**METHODS, **(FULL_METHODS if args.full else {})}
    runs = [{"name": BASE, "method": BASE, "seed": None, "dir": BASE}]
    for index in range(args.seeds):
        seed = args.seed + index
        for name, method in methods.items():
            folder = name if index == 0 else f"{name}-seed{seed}"
            learning_rate = method.get("learning_rate", args.learning_rate)
            runs.append({"name": name, "method": name, "seed": seed, "dir": folder, "learning_rate": learning_rate,
                         "fields": method})  # fmt: skip
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    runs = planned_runs(args)
    trained = [run for run in runs if run["name"] != BASE]
    configs = {run["dir"]: run_config(args, run["dir"], run["fields"], run["seed"]) for run in trained}
    earlier = [name for name in [BASE, *configs] if (out / name).is_dir() and any((out / name).iterdir())]
    if earlier:  # the demo's own folder, but say so: the models trained there before are replaced
        console.print(
            f"{out} holds an earlier study: its runs {', '.join(earlier)} are replaced by this one "
            "(their eval.json files are kept aside). Pass --output_dir to keep them as they are."
        )

    dashboard = Dashboard() if tui_enabled(args.tui, sys.stderr) else None
    for index, (folder, config) in enumerate(configs.items()):
        console.rule(f"[bold]training {folder}")
        if dashboard is not None:  # which run of the study trains now, which are done
            status = ["done"] * index + ["training"] + ["pending"] * (len(configs) - index - 1)
            dashboard.state.study = [StudyRun(n, s) for n, s in zip(configs, status, strict=True)]
        # The runs share this process: each one's peak memory starts from here, not from an earlier run's peak.
        reset_device_peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        result = run_sft(config, callbacks=[dashboard] if dashboard else [])
        if dashboard is not None and folder == REFERENCE:  # the later runs show their activation peak beside E2E's
            dashboard.state.e2e_activation_bytes = result.activation_peak_bytes
        console.print(
            f"{folder}: {result.steps} steps in {result.elapsed_s:.0f} s, task loss "
            f"{result.first_loss:.4f} -> {result.last_loss:.4f}"
        )

    options = EvalOptions(
        task=args.task, eval_samples=args.eval_samples, second_task=args.second_task or None,
        second_samples=args.second_samples, max_new_tokens=args.max_new_tokens,
        batch_size=64, retention_windows=args.retention_windows,
    )  # fmt: skip
    # Every model answers the same held-out problems: none that any run trained on.
    trained_dirs = [Path(config.output_dir) for config in configs.values()]
    for run in runs:
        console.rule(f"[bold]evaluating {run['dir']}")
        folder = out / run["dir"]
        folder.mkdir(parents=True, exist_ok=True)
        model = args.model if run["name"] == BASE else str(folder)
        write_eval(folder, evaluate_model(model, options, heldout_from=trained_dirs))

    settings = {
        "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
        "learning_rate": args.learning_rate, "seeds": [args.seed + i for i in range(args.seeds)],
        "eval_samples": args.eval_samples, "second_samples": args.second_samples,
        "retention_windows": args.retention_windows, "retention_window": options.retention_window,
        "max_new_tokens": args.max_new_tokens, "bf16": args.bf16,
    }  # fmt: skip
    title = (
        f"lopt demo: {args.model} on {args.task}, {args.steps} steps x {args.batch_size} sequences, "
        f"{args.seeds} seed(s) from {args.seed}"
    )
    study = {"title": title, "task": args.task, "second_task": args.second_task, "reference": REFERENCE,
             "settings": settings, "runs": runs}  # fmt: skip
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    rows = write_study_report(out)
    print(f"\n{title}\n\n" + "\n".join(markdown_table(study, rows)) + "\n", flush=True)  # stdout: copyable markdown
    console.print(
        f"\nreport: {out / 'report.md'}, {out / 'report.html'} | total time {time.perf_counter() - start:.0f} s"
    )
