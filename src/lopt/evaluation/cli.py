"""`lopt eval MODEL_DIR...`: task accuracy, retention and (optionally) lm-eval benchmarks of saved models.

Each evaluated folder gets an `eval.json` (the schema `evaluate_model` returns) that `lopt report`
reads next to the run's training_args.json and metrics.jsonl. The starting model, for the retention
baseline, is the one the run's training_args.json names (or `--base_model`).

torch and the model code are imported by the functions that use them: `lopt eval --help` and a wrong flag
need neither, and importing them takes seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from lopt.errors import LoptError
from lopt.keep_previous import keep_previous
from lopt.models.lora import adapter_base_model, is_adapter_folder, saved_parameters
from lopt.output import LOG_LEVELS, console, phase, plural
from lopt.tasks import EVALUABLE_TASKS, get_task

if TYPE_CHECKING:
    import torch


@dataclass
class EvalOptions:
    task: str = "gsm-symbolic"
    eval_samples: int = 200  # 0 skips task accuracy
    max_new_tokens: int = 256
    batch_size: int = 16
    retention_file: str | None = None
    retention_window: int = 256
    retention_windows: int = 32  # 0 skips retention
    base_model: str | None = None
    harness: tuple[str, ...] = ()
    harness_include: str | None = None
    harness_limit: int | None = None


def base_model_of(model: str, options: EvalOptions) -> str:
    """The model a run started from: --base_model, else its training_args.json, else the model itself."""
    if options.base_model:
        return options.base_model
    args_file = Path(model) / "training_args.json"
    if args_file.is_file():
        return json.loads(args_file.read_text())["model_name_or_path"]
    if is_adapter_folder(model):
        return adapter_base_model(model)
    return model


def _device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _perplexity_of(name: str, options: EvalOptions, text: str) -> float:
    from lopt.evaluation.retention import token_windows
    from lopt.models.registry import load_model_and_tokenizer

    try:
        what = "--base_model" if options.base_model else "the starting model"
        model, tokenizer = load_model_and_tokenizer(name, device=_device(), what=what)
    except LoptError as error:  # e.g. a training_args.json written on another machine names a path not here
        raise LoptError(
            f"cannot load the starting model {name!r} for the retention baseline: {error}\n"
            "Pass --base_model with a model available here."
        ) from error
    windows = token_windows(tokenizer, text, options.retention_window, options.retention_windows)
    return _measured_perplexity(model, windows, options.batch_size, f"the starting model {name}")


def _measured_perplexity(model, windows: torch.Tensor, batch_size: int, whose: str) -> float:
    from lopt.evaluation.retention import perplexity

    with phase(f"perplexity of {whose} on {windows.numel():,} tokens of general text") as measuring:
        value = perplexity(model, windows, batch_size=batch_size)
        measuring.result = f"{value:.2f}"
    return value


def evaluate_model(
    model: str,
    options: EvalOptions,
    base_perplexities: dict[str, float] | None = None,
    heldout_from: Path | None = None,
) -> dict:
    """Evaluate one model (a folder, alias or hub id) and return its eval.json content.

    The problems exclude those the run in `heldout_from` trained on (default: the model's own folder,
    if it is a run), so a starting model can be scored on the same problems as the runs made from it.
    `base_perplexities` caches the starting models' perplexities across calls (several runs usually
    share one starting model, and its perplexity is the costliest part of retention).
    """
    from lopt.evaluation.retention import DEFAULT_SOURCE, relative_change, retention_text, token_windows
    from lopt.evaluation.task import load_task, task_accuracy, training_questions
    from lopt.models.registry import load_model_and_tokenizer

    if options.harness and not Path(model).is_dir():
        raise LoptError(f"--harness runs on a saved model folder; {model!r} is not one.")
    base_perplexities = {} if base_perplexities is None else base_perplexities
    start = time.perf_counter()
    base = base_model_of(model, options)
    result: dict = {"model": str(model), "base_model": base}
    if is_adapter_folder(model):
        result["adapter_parameters"] = saved_parameters(Path(model))
    net, tokenizer = load_model_and_tokenizer(model, device=_device(), what="MODEL_DIR")
    if options.eval_samples > 0:
        run = Path(heldout_from or model)
        exclude = training_questions(run) if run.is_dir() else set()
        records = load_task(options.task, options.eval_samples, exclude)
        with phase(f"answering {plural(len(records), 'held-out ' + options.task + ' problem')}") as answering:
            scores = task_accuracy(
                net, tokenizer, records, batch_size=options.batch_size, max_new_tokens=options.max_new_tokens,
                style=get_task(options.task).style,
            )  # fmt: skip
            answering.result = f"{scores['correct']}/{scores['n']} correct ({scores['accuracy']:.1%})"
        result.update(task=options.task, max_new_tokens=options.max_new_tokens, **scores)
    if options.retention_windows > 0:
        text = retention_text(options.retention_file)
        windows = token_windows(tokenizer, text, options.retention_window, options.retention_windows)
        value = _measured_perplexity(net, windows, options.batch_size, str(model))
        if base == model:
            base_value = value
        else:
            if base not in base_perplexities:
                base_perplexities[base] = _perplexity_of(base, options, text)
            base_value = base_perplexities[base]
        result.update(
            retention_source=options.retention_file or DEFAULT_SOURCE,
            retention_tokens=windows.numel(),
            perplexity=value,
            base_perplexity=base_value,
            retention_change=relative_change(value, base_value),
        )
    del net
    if options.harness:
        from lopt.evaluation.harness import run_harness

        with phase(f"lm-eval {', '.join(options.harness)}"):
            result["harness"] = run_harness(
                model,
                list(options.harness),
                include_path=options.harness_include,
                limit=options.harness_limit,
                device=str(_device()),
            )
    result["eval_seconds"] = time.perf_counter() - start
    return result


def write_eval(folder: Path, result: dict) -> Path:
    """Write `eval.json` into the model's folder; an earlier evaluation's file is kept aside, and said."""
    path = Path(folder) / "eval.json"
    kept = keep_previous(path)
    if kept is not None:
        console.print(f"kept the earlier evaluation as {kept}")
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def results_table(rows: list[tuple[str, dict]], title: str = "lopt eval") -> Table:
    """One row per evaluated model: accuracy, perplexity, retention change, harness scores."""
    harness_cols = sorted(
        {(task, metric) for _, r in rows for task, scores in r.get("harness", {}).items() for metric in scores}
    )
    table = Table(title=title)
    for column in ("model", "task accuracy", "perplexity", "vs start", *(f"{t} {m}" for t, m in harness_cols)):
        table.add_column(column)
    for name, r in rows:
        accuracy = f"{r['accuracy']:.1%} ({r['correct']}/{r['n']})" if "accuracy" in r else "-"
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        harness = [f"{r.get('harness', {}).get(t, {}).get(m, float('nan')):.3f}" for t, m in harness_cols]
        if "adapter_parameters" in r:  # a LoRA folder: what it trained is what it holds
            name = f"{name} (LoRA adapter, {r['adapter_parameters']:,} trained parameters)"
        table.add_row(name, accuracy, ppl, _percent(r.get("retention_change")), *harness)
    return table


def main(argv: list[str] | None = None) -> None:
    defaults = EvalOptions()
    parser = argparse.ArgumentParser(prog="lopt eval", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR", help="saved model folders (or an alias / hub id)")
    parser.add_argument(
        "--task",
        default=defaults.task,
        choices=EVALUABLE_TASKS,
        help="gsm-symbolic: generated offline, minus the run's training questions; gsm8k: test split (hub) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--eval_samples", type=int, default=defaults.eval_samples,
        help="problems to solve (0: skip task accuracy) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max_new_tokens", type=int, default=defaults.max_new_tokens,
        help="answer length limit, in tokens (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--batch_size", type=int, default=defaults.batch_size, help="sequences per forward (default: %(default)s)"
    )
    parser.add_argument(
        "--retention_file", help="UTF-8 text for perplexity (default: reasoning-gym's Gutenberg novella)"
    )
    parser.add_argument(
        "--retention_window", type=int, default=defaults.retention_window,
        help="tokens per window (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--retention_windows",
        type=int,
        default=defaults.retention_windows,
        help="number of windows (0: skip retention) (default: %(default)s)",
    )
    parser.add_argument(
        "--base_model", help="starting model for the retention baseline (default: training_args.json's)"
    )
    parser.add_argument(
        "--harness",
        default="",
        help="comma-separated lm-eval tasks, e.g. mmlu,arc_challenge,hellaswag,winogrande,truthfulqa_mc2,gsm8k,ifeval "
        "(default: none)",
    )
    parser.add_argument("--harness_include", help="folder of extra lm-eval task YAMLs (default: none)")
    parser.add_argument("--harness_limit", type=int, help="at most N documents per harness task (default: all)")
    parser.add_argument(
        "--reward_model",
        action="store_true",
        help="the folders are reward models (`lopt rm`): report their pairwise accuracy on held-out preference pairs "
        "instead of task accuracy and retention",
    )
    parser.add_argument(
        "--pairs",
        default="gsm-symbolic-reasoning-pairs",
        help="with --reward_model: a preference file, or a preset (gsm-symbolic-reasoning-pairs, gsm-symbolic-pairs: "
        "built from held-out problems; hh-rlhf, ultrafeedback: their test split) (default: %(default)s)",
    )
    parser.add_argument(
        "--log_level", default="info", choices=LOG_LEVELS,
        help="info: lopt's phases, libraries quiet; debug: also every library's bars and logs (default: info)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("eval_samples", "retention_windows"):
        if getattr(args, flag) < 0:
            raise LoptError(f"--{flag} must be >= 0 (0 skips that measurement), got {getattr(args, flag)}.")
    for flag in ("max_new_tokens", "batch_size", "retention_window"):
        if getattr(args, flag) < 1:
            raise LoptError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.reward_model:
        _evaluate_reward_models(args.models, args.pairs, args.eval_samples, args.batch_size)
        return
    options = EvalOptions(
        **{k: v for k, v in vars(args).items() if k not in ("models", "harness", "log_level", "reward_model", "pairs")},
        harness=tuple(t.strip() for t in args.harness.split(",") if t.strip()),
    )
    rows, base_perplexities = [], {}
    for model in args.models:
        result = evaluate_model(model, options, base_perplexities)
        if Path(model).is_dir():
            console.print(f"wrote {write_eval(Path(model), result)}")
        rows.append((model, result))
    console.print(results_table(rows))


def _evaluate_reward_models(models: list[str], pairs: str, n: int, batch_size: int) -> None:
    """--reward_model: each model's pairwise accuracy on `n` held-out pairs of `pairs`, into its eval.json."""
    from lopt.evaluation.reward_model import heldout_pairs, pairwise_accuracy
    from lopt.models.registry import load_model_and_tokenizer
    from lopt.models.reward_model import check_reward_model_config

    table = Table(title="lopt eval --reward_model")
    for column in ("model", "pairs", "pairwise accuracy", "mean margin"):
        table.add_column(column)
    for model in models:
        check_reward_model_config(model, "MODEL_DIR")
        run = Path(model) if Path(model).is_dir() else None
        held_out = heldout_pairs(pairs, n, run)
        net, tokenizer = load_model_and_tokenizer(model, device=_device(), what="MODEL_DIR", reward_model=True)
        with phase(f"scoring {plural(len(held_out), 'held-out pair')} of {pairs}") as scoring:
            result = {"model": str(model), "pairs": pairs, **pairwise_accuracy(net, tokenizer, held_out, batch_size)}
            scoring.result = f"{result['correct']}/{result['n']} ranked right ({result['pairwise_accuracy']:.1%})"
        if run is not None:
            console.print(f"wrote {write_eval(run, result)}")
        table.add_row(
            model, pairs, f"{result['pairwise_accuracy']:.1%} ({result['correct']}/{result['n']})",
            f"{result['mean_margin']:+.3f}",
        )  # fmt: skip
        del net
    console.print(table)
