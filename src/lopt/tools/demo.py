"""`lopt demo`: the E2E-vs-LoPT study on the embedded SmolLM2-135M and gsm-symbolic, on any machine.

It trains E2E, LoPT k=2 and LoPT k=4 (and, with --ablation, k=2 with frozen early blocks) on the
same data, seed, steps and learning rate through the same code path as `lopt sft`; evaluates each
saved folder and the starting model (held-out accuracy, perplexity on general text); prints the
comparison table and writes report.md / report.html with plots. Every number comes from the runs
just made. The defaults fit in about 15 minutes on a 2-core CPU; --steps and --eval_samples scale up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lopt.config import SFTConfig, validate
from lopt.dashboard import Dashboard, tui_enabled
from lopt.dashboard.state import StudyRun
from lopt.evaluation.cli import EvalOptions, evaluate_model, write_eval
from lopt.models.registry import DEFAULT_MODEL
from lopt.output import console
from lopt.recipes.sft import run_sft
from lopt.tools.report import markdown_table, write_report

# name -> the SFTConfig fields that make the method; everything else is shared by all runs.
METHODS = {
    "e2e": {"method": "e2e"},
    "lopt-k2": {"method": "lopt", "num_blocks": 2},
    "lopt-k4": {"method": "lopt", "num_blocks": 4},
}
ABLATION = {"frozen-k2": {"method": "lopt", "num_blocks": 2, "early_blocks": "frozen"}}
BASE = "base"  # the folder that holds the starting model's eval.json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lopt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each run (default: 12)")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--max_seq_length", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="learning rate of every run (default: 1e-4)")
    parser.add_argument("--eval_samples", type=int, default=16, help="held-out problems per model (default: 16)")
    parser.add_argument("--max_new_tokens", type=int, default=160, help="answer length limit (default: 160)")
    parser.add_argument(
        "--retention_windows", type=int, default=8, help="256-token windows of general text for perplexity (default: 8)"
    )
    parser.add_argument("--ablation", action="store_true", help="also train LoPT k=2 with frozen early blocks")
    parser.add_argument(
        "--output_dir",
        default="outputs/demo",
        help="study folder: one subfolder per run, the report next to them (default: outputs/demo)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--tui", action=argparse.BooleanOptionalAction, default=None,
        help="full-screen live dashboard while the runs train (default: on with LOPT_TUI=1, on a terminal)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "max_seq_length", "eval_samples", "max_new_tokens", "retention_windows"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return args


def run_config(args: argparse.Namespace, name: str, method: dict) -> SFTConfig:
    config = SFTConfig(
        model_name_or_path=DEFAULT_MODEL,
        dataset_preset="gsm-symbolic",
        max_samples=args.steps * args.batch_size,
        max_seq_length=args.max_seq_length,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        warmup_ratio=0.1,
        logging_steps=max(args.steps // 6, 1),
        save_steps=0,
        seed=args.seed,
        output_dir=str(Path(args.output_dir) / name),
        overwrite_output_dir=True,  # the demo's own folder; each demo run replaces the last one's files
        explicit=frozenset(method),
        **method,
    )
    validate(config)
    return config


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    methods = {**METHODS, **(ABLATION if args.ablation else {})}
    configs = {name: run_config(args, name, method) for name, method in methods.items()}
    earlier = [name for name in configs if (out / name).is_dir() and any((out / name).iterdir())]
    if earlier:  # the demo's own folder, but say so: the models trained there before are replaced
        console.print(
            f"{out} holds an earlier study: its runs {', '.join(earlier)} are replaced by this one "
            "(their eval.json files are kept aside). Pass --output_dir to keep them as they are."
        )

    dashboard = Dashboard() if tui_enabled(args.tui, sys.stderr) else None
    for index, (name, config) in enumerate(configs.items()):
        console.rule(f"[bold]training {name}")
        if dashboard is not None:  # which run of the study trains now, which are done
            status = ["done"] * index + ["training"] + ["pending"] * (len(configs) - index - 1)
            dashboard.state.study = [StudyRun(n, s) for n, s in zip(configs, status, strict=True)]
        result = run_sft(config, callbacks=[dashboard] if dashboard else [])
        if dashboard is not None and name == "e2e":  # the later runs show their activation peak beside E2E's
            dashboard.state.e2e_activation_bytes = result.activation_peak_bytes
        console.print(
            f"{name}: {result.steps} steps in {result.elapsed_s:.0f} s, task loss "
            f"{result.first_loss:.4f} -> {result.last_loss:.4f}"
        )

    options = EvalOptions(
        eval_samples=args.eval_samples, max_new_tokens=args.max_new_tokens, retention_windows=args.retention_windows
    )
    console.rule("[bold]evaluating the starting model")
    (out / BASE).mkdir(parents=True, exist_ok=True)
    # Scored on the runs' held-out problems (they all trained on the same data).
    base = evaluate_model(DEFAULT_MODEL, options, heldout_from=Path(next(iter(configs.values())).output_dir))
    write_eval(out / BASE, base)
    base_perplexities = {DEFAULT_MODEL: base["perplexity"]}
    evaluations = {}
    for name, config in configs.items():
        console.rule(f"[bold]evaluating {name}")
        evaluations[name] = evaluate_model(config.output_dir, options, base_perplexities)
        write_eval(Path(config.output_dir), evaluations[name])

    title = (
        f"lopt demo: SmolLM2-135M-Instruct on gsm-symbolic, {args.steps} steps x {args.batch_size} x "
        f"{args.max_seq_length} tokens, lr {args.learning_rate:g}, seed {args.seed}"
    )
    runs = write_report([out / BASE, *(Path(c.output_dir) for c in configs.values())], out, title)
    print(f"\n{title}\n\n" + "\n".join(markdown_table(runs)) + "\n", flush=True)  # stdout: copyable markdown
    # The same held-out question answered before and after LoPT k=2 training (greedy, from the saved folder).
    before, after = base["samples"][0], evaluations["lopt-k2"]["samples"][0]
    console.print(f"[bold]held-out question[/] (expected answer {before['gold']}):\n{before['question']}")
    console.print(
        f"\n[bold]before training[/]:\n{before['completion']}\n\n[bold]after LoPT k=2[/]:\n{after['completion']}"
    )
    console.print(
        f"\nreport: {out / 'report.md'}, {out / 'report.html'} | total time {time.perf_counter() - start:.0f} s"
    )
