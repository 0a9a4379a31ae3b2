"""`lopt demo`: the study of whether LoPT is worth it, on the embedded SmolLM2-135M and a task it can learn on a CPU.

It trains each method on the same problems, steps, schedule and seed through the same code path as `lopt sft`,
then evaluates each saved model and the starting model on the same held-out problems: task accuracy with its 95%
interval (paired McNemar tests against E2E), and retention three ways (perplexity change on general text, the mean
per-token KL from the starting model there, accuracy on a second task no run trained on), with where in the model
each method changed it (per-layer CKA and weight change). It writes study.json, report.md / report.html with plots
(lopt/study/report.py), and prints the table. Every number comes from the runs just made.

The default task is aiw ("Alice has 3 sisters and 2 brothers. How many sisters does her brother have?"): one-number
answers, so that generation is cheap; the starting model answers few of them, E2E SFT learns them within minutes
on a CPU. The default methods fit `make demo` in about 15 minutes on a 2-core CPU; --full adds the rest. --sweep
adds LoPT with each of its own knobs changed alone from the paper's setting, at k=2 and k=4, so that the study can
say which setting LoPT does best with (the report's "LoPT's knobs" section). --write_docs puts a study's report into
the study page (docs/study.md, between its markers: study/docs.py), so that the page is generated, not copied.
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
from lopt.study.docs import BEGIN, END, write_docs
from lopt.study.report import markdown_table, write_study_report
from lopt.study.variants import LR_K1_FRACTION, VARIANTS, config_fields
from lopt.tasks import EVALUABLE_TASKS
from lopt.training.memory import reset_device_peak

# The study's methods, variants of lopt.study.variants: everything but their own fields is shared by all runs.
METHODS = ("e2e", "lopt-k2", "lora")
# --full adds these, in the order they leave the default study when the budget is short (the order reversed).
FULL_METHODS = ("frozen-k2", "lopt-k4", "kl-sft", "lopt-k2-lora")
# --sweep: each of LoPT's own knobs changed alone from the paper's setting (the config's defaults: aux_loss recon,
# lambda_aux 10, lr_k1 = learning rate, global gradient clipping), at k=2 and at k=4. knob -> the fields it changes.
SWEEP_KNOBS = {
    "lambda_aux=1": {"lambda_aux": 1.0},
    "lr_k1=lr/10": {LR_K1_FRACTION: 0.1},
    "recon_normalized": {"aux_loss": "recon_normalized"},
    "clip_per_block": {"clip_per_block": True},
}
SWEEP_BLOCKS = (2, 4)
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
    parser.add_argument(
        "--sweep", action="store_true",
        help=f"also train LoPT at k={' and k='.join(map(str, SWEEP_BLOCKS))} with each of its knobs changed alone "
        f"from the paper's setting ({', '.join(SWEEP_KNOBS)}); the report compares each with the paper's setting",
    )  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights (GPU)")
    parser.add_argument(
        "--output_dir", default="outputs/demo",
        help="study folder: one subfolder per run, the report next to them (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=42, help="first seed; more seeds count up from it")
    parser.add_argument(
        "--write_docs", metavar="PAGE",
        help=f"train nothing: put the report of the study already in --output_dir (its report.md) into PAGE, between "
        f"the lines {BEGIN} and {END}, replacing what was there (docs/study.md)",
    )  # fmt: skip
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


def sweep_methods(learning_rate: float) -> dict[str, tuple[dict, dict]]:
    """--sweep's runs: name -> (SFTConfig fields, what the report needs: k and the knob). The paper's setting is the
    config's defaults, so it is `{"method": "lopt", "num_blocks": k}`."""
    runs = {}
    for blocks in SWEEP_BLOCKS:
        paper = {"method": "lopt", "num_blocks": blocks}
        runs[f"lopt-k{blocks}-paper"] = (paper, {"k": blocks, "knob": "paper"})
        for knob, change in SWEEP_KNOBS.items():
            fields = config_fields({**paper, **change}, learning_rate)
            runs[f"lopt-k{blocks}-{knob.split('=')[0]}"] = (fields, {"k": blocks, "knob": knob})
    return runs


def _methods(args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, dict]]:
    """The study's methods (name -> SFTConfig fields) and, with --sweep, each swept method's sweep entry. A sweep run
    whose fields are those of a study method already planned is that method: trained once, under its own name."""
    chosen = [*METHODS, *(FULL_METHODS if args.full else ())]
    methods = {name: config_fields(VARIANTS[name], args.learning_rate) for name in chosen}
    sweep: dict[str, dict] = {}
    if args.sweep:
        renamed = {}
        for name, (fields, entry) in sweep_methods(args.learning_rate).items():
            same = next((known for known, known_fields in methods.items() if known_fields == fields), None)
            renamed[name] = same or name
            methods.setdefault(renamed[name], fields)
            sweep[renamed[name]] = entry
        for entry in sweep.values():
            entry["paper"] = renamed[f"lopt-k{entry['k']}-paper"]
    return methods, sweep


def planned_runs(args: argparse.Namespace) -> list[dict]:
    """study.json's runs: the starting model, then each method once per seed (folder `name`, then `name-seed<S>`);
    a swept method's runs carry their sweep entry (k, knob, the paper-setting method it is compared with)."""
    methods, sweep = _methods(args)
    runs = [{"name": BASE, "method": BASE, "seed": None, "dir": BASE}]
    for index in range(args.seeds):
        seed = args.seed + index
        for name, method in methods.items():
            folder = name if index == 0 else f"{name}-seed{seed}"
            learning_rate = method.get("learning_rate", args.learning_rate)
            run = {"name": name, "method": name, "seed": seed, "dir": folder, "learning_rate": learning_rate,
                   "fields": method}  # fmt: skip
            runs.append({**run, "sweep": sweep[name]} if name in sweep else run)
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    if args.write_docs:
        write_docs(Path(args.write_docs), out)
        console.print(f"wrote the report of {out} into {args.write_docs}")
        return
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
        "max_new_tokens": args.max_new_tokens, "bf16": args.bf16, "sweep": args.sweep,
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
