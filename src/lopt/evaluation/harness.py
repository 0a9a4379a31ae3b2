"""Standard benchmarks through EleutherAI's lm-evaluation-harness (`pip install 'lopt[harness]'`).

The harness runs its own Hugging Face backend on the saved model folder, so what is scored is the
checkpoint a user ships, loaded the way anyone else would load it. Its benchmark data comes from the
hub; `include_path` adds task YAMLs from a local folder (the tests use one with local data).
"""

from __future__ import annotations

from pathlib import Path

from lopt.errors import LoptError

# The reference implementation's benchmark list.
REFERENCE_TASKS = ("mmlu", "arc_challenge", "hellaswag", "winogrande", "truthfulqa_mc2", "gsm8k", "ifeval")


def _task_manager(tasks: list[str], include_path: str | None):
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise LoptError(f"--harness_include {include_path}: no such folder; pass a folder of lm-eval task YAMLs.")
        # Indexing lm-eval's own thousands of task files takes ~30 s; skip it when the local folder
        # has every requested task.
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LoptError(
            f"--harness: unknown lm-eval task(s) {', '.join(unknown)}. The reference's list is "
            f"{','.join(REFERENCE_TASKS)}; `lm-eval ls tasks` lists all, --harness_include adds a folder of YAMLs."
        )
    return manager


def run_harness(
    model_dir: str | Path,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Scores per task, `{task: {"acc,none": 0.41, ...}}`: every numeric metric lm-eval reports, stderr excluded."""
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        raise LoptError(
            "--harness needs EleutherAI's lm-evaluation-harness: pip install 'lopt[harness]' (or pip install lm-eval)."
        ) from None
    results = simple_evaluate(
        # float32 on CPU (bf16 matmuls are slow there); on a GPU the dtype the checkpoint was saved in.
        model="hf",
        model_args=_model_args(model_dir, device),
        tasks=tasks,
        task_manager=_task_manager(tasks, include_path),
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=False,
    )
    return {
        task: {
            metric: value
            for metric, value in scores.items()
            if isinstance(value, (int, float)) and "_stderr" not in metric and metric != "sample_len"
        }
        for task, scores in results["results"].items()
    }


def _model_args(model_dir, device: str) -> dict:
    """lm-eval's HF model arguments; a LoRA adapter folder goes in as `peft` on the base it names."""
    from lopt.models.lora import adapter_base_model, is_adapter_folder
    from lopt.models.registry import resolve_model

    args = {"pretrained": str(model_dir), "dtype": "float32" if device == "cpu" else "auto"}
    if is_adapter_folder(model_dir):
        args.update(pretrained=resolve_model(adapter_base_model(model_dir)), peft=str(model_dir))
    return args
