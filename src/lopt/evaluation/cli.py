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

from lopt.data.tasks import EVALUABLE_TASKS, get_task
from lopt.errors import LoptError
from lopt.keep_previous import keep_previous
from lopt.models.lora import adapter_base_model, is_adapter_folder
from lopt.output import LOG_LEVELS, console, phase, plural
from lopt.runs import saved_parameters

if TYPE_CHECKING:
    import torch


@dataclass
class EvalOptions:
    task: str = "gsm-symbolic"
    eval_samples: int = 200  # 0 skips task accuracy
    second_task: str | None = None  # a task the model did not train on, scored too (what it kept)
    second_samples: int = 200
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


def _load_base(name: str, options: EvalOptions):
    from lopt.models.registry import load_model_and_tokenizer

    try:
        what = "--base_model" if options.base_model else "the starting model"
        return load_model_and_tokenizer(name, device=_device(), what=what)[0]
    except LoptError as error:  # e.g. a training_args.json written on another machine names a path not here
        raise LoptError(
            f"cannot load the starting model {name!r} for the retention baseline: {error}\n"
            "Pass --base_model with a model available here."
        ) from error


def _accuracy(net, tokenizer, task: str, records: list[dict], options: EvalOptions) -> dict:
    from lopt.evaluation.task import task_accuracy

    with phase(f"answering {plural(len(records), 'held-out ' + task + ' problem')}") as answering:
        scores = task_accuracy(
            net, tokenizer, records, batch_size=options.batch_size, max_new_tokens=options.max_new_tokens,
            style=get_task(task).style,
        )  # fmt: skip
        answering.result = (
            f"{scores['correct']}/{scores['n']} correct ({scores['accuracy']:.1%}), "
            f"{scores['generated_tokens'] / max(scores['generation_s'], 1e-9):.0f} generated tokens/s"
        )
    return {"task": task, **scores}


def _retention(net, model: str, base: str, tokenizer, options: EvalOptions) -> dict:
    """Perplexity on general text, and, against the starting model, how far the model moved: per-token KL of
    their next-token distributions, CKA of each decoder layer's hidden states, each layer's relative weight change."""
    from lopt.evaluation.drift import drift, layer_weight_change
    from lopt.evaluation.retention import DEFAULT_SOURCE, perplexity, relative_change, retention_text, token_windows

    windows = token_windows(tokenizer, retention_text(options.retention_file), options.retention_window,
                            options.retention_windows)  # fmt: skip
    result = {"retention_source": options.retention_file or DEFAULT_SOURCE, "retention_tokens": windows.numel()}
    if base == model:  # the starting model itself: nothing moved
        with phase(f"perplexity of {model} on {windows.numel():,} tokens of general text") as measuring:
            value = perplexity(net, windows, batch_size=options.batch_size)
            measuring.result = f"{value:.2f}"
        return {**result, "perplexity": value, "base_perplexity": value, "retention_change": 0.0, "kl_to_base": 0.0}
    reference = _load_base(base, options)
    with phase(f"perplexity, KL and per-layer CKA against {base} on {windows.numel():,} tokens") as measuring:
        try:
            moved = drift(net, reference, windows, batch_size=options.batch_size)
            weight_change = layer_weight_change(net, reference)
        except ValueError as error:  # another architecture: not the model this one started from
            raise LoptError(f"{model} cannot be compared with the starting model {base}: {error}. "
                            "Pass --base_model with the model it was trained from.") from None  # fmt: skip
        measuring.result = (
            f"perplexity {moved.perplexity:.2f} (start {moved.reference_perplexity:.2f}), KL {moved.kl:.4f}"
        )
    return {
        **result,
        "perplexity": moved.perplexity,
        "base_perplexity": moved.reference_perplexity,
        "retention_change": relative_change(moved.perplexity, moved.reference_perplexity),
        "kl_to_base": moved.kl,
        "layer_cka": moved.layer_cka,
        "layer_weight_change": weight_change,
    }


def evaluate_model(model: str, options: EvalOptions, heldout_from: list[Path] | None = None) -> dict:
    """Evaluate one model (a folder, alias or hub id) and return its eval.json content.

    The problems exclude those the runs in `heldout_from` trained on (default: the model's own folder, if it is a
    run), so a starting model and several runs can be scored on the same problems, none of which any of them saw.
    """
    from lopt.evaluation.task import load_task, training_questions
    from lopt.models.registry import load_model_and_tokenizer

    if options.harness and not Path(model).is_dir():
        raise LoptError(f"--harness runs on a saved model folder; {model!r} is not one.")
    start = time.perf_counter()
    base = base_model_of(model, options)
    result: dict = {"model": str(model), "base_model": base}
    if is_adapter_folder(model):
        result["adapter_parameters"] = saved_parameters(Path(model))
    net, tokenizer = load_model_and_tokenizer(model, device=_device(), what="MODEL_DIR")
    if options.eval_samples > 0:
        runs = heldout_from if heldout_from is not None else [Path(model)]
        exclude = set().union(*(training_questions(run) for run in runs if run.is_dir()))
        records = load_task(options.task, options.eval_samples, exclude)
        result.update(
            max_new_tokens=options.max_new_tokens, **_accuracy(net, tokenizer, options.task, records, options)
        )
    if options.second_task and options.second_samples > 0:  # a task the run did not train on: what it kept
        records = load_task(options.second_task, options.second_samples, set())
        result["second_task"] = _accuracy(net, tokenizer, options.second_task, records, options)
    if options.retention_windows > 0:
        result.update(_retention(net, str(model), base, tokenizer, options))
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


def _accuracy_cell(r: dict | None) -> str:
    if not r or "accuracy" not in r:
        return "-"
    low, high = r.get("accuracy_interval", (None, None))
    interval = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else ""
    return f"{r['accuracy']:.1%}{interval} ({r['correct']}/{r['n']})"


def results_table(rows: list[tuple[str, dict]], title: str = "lopt eval") -> Table:
    """One row per evaluated model: accuracy with its 95% interval, the second task's, perplexity, retention
    change, KL to the starting model, harness scores."""
    harness_cols = sorted(
        {(task, metric) for _, r in rows for task, scores in r.get("harness", {}).items() for metric in scores}
    )
    table = Table(title=title)
    second = any("second_task" in r for _, r in rows)
    columns = ["model", "task accuracy [95% interval]", *(["second task"] if second else []), "perplexity", "vs start",
               "KL to start", *(f"{t} {m}" for t, m in harness_cols)]  # fmt: skip
    for column in columns:
        table.add_column(column)
    for name, r in rows:
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        kl = f"{r['kl_to_base']:.4f}" if "kl_to_base" in r else "-"
        harness = [f"{r.get('harness', {}).get(t, {}).get(m, float('nan')):.3f}" for t, m in harness_cols]
        if "adapter_parameters" in r:  # a LoRA folder: what it trained is what it holds
            name = f"{name} (LoRA adapter, {r['adapter_parameters']:,} trained parameters)"
        second_cell = [_accuracy_cell(r.get("second_task"))] if second else []
        table.add_row(name, _accuracy_cell(r), *second_cell, ppl, _percent(r.get("retention_change")), kl, *harness)
    return table


def main(argv: list[str] | None = None) -> None:
    defaults = EvalOptions()
    parser = argparse.ArgumentParser(prog="lopt eval", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR", help="saved model folders (or an alias / hub id)")
    parser.add_argument(
        "--task",
        default=defaults.task,
        choices=EVALUABLE_TASKS,
        help="gsm-symbolic, aiw, chain-sum: generated offline, minus the run's training questions; gsm8k: test split "
        "(hub) (default: %(default)s)",
    )
    parser.add_argument(
        "--second_task", choices=EVALUABLE_TASKS,
        help="also score a task the model did not train on (what it kept), e.g. chain-sum (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--second_samples", type=int, default=defaults.second_samples,
        help="problems of --second_task (default: %(default)s)",
    )  # fmt: skip
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
    for flag in ("eval_samples", "second_samples", "retention_windows"):
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
    rows = []
    for model in args.models:
        result = evaluate_model(model, options)
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
