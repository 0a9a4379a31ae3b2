"""Task accuracy: greedy answers to a task's held-out problems (lopt/data/tasks.py), scored by their final answer.

Questions are prompted exactly as SFT trains on them (`build_prompt` over the question followed by
the task's answer instruction), so a fine-tuned model is asked in the format it learned. The final
answer is read with `lopt.answers`, the parser the rewards use, from both the generation and the
reference solution, in the task's answer style (gsm-symbolic and GSM8K: `#### <answer>`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lopt.answers import answers_match, extract_final_answer
from lopt.data.collate import build_prompt
from lopt.data.generated import DEFAULT_GSM_SAMPLES
from lopt.data.tasks import TASKS, get_task
from lopt.evaluation.statistics import wilson_interval


def training_questions(run_dir: Path) -> set[str]:
    """The generated questions (an offline task's preset) a run trained on, rebuilt from its training_args.json
    (empty if none)."""
    args_file = run_dir / "training_args.json"
    if not args_file.is_file():
        return set()
    args = json.loads(args_file.read_text())
    task = TASKS.get(args.get("dataset_preset", ""))
    if args.get("train_file") or args.get("dataset_name") or task is None or task.generate is None:
        return set()
    size = args.get("max_samples") or DEFAULT_GSM_SAMPLES
    return {record["question"] for record in task.generate(size, args.get("seed", 42))}


def load_task(task: str, n: int, exclude: set[str]) -> list[dict]:
    """`n` held-out problems of `task` (lopt/data/tasks.py), none of them in `exclude`."""
    return get_task(task, evaluable=True).heldout(n, exclude)


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy completions of the training-format prompts, in batches padded on the left.

    Left padding puts every prompt's last token at the same position, so all rows of a batch start
    generating at once; the pad tokens are masked out of attention. Each row stops at its end-of-sequence token
    (the batch at its last row's, or at `max_new_tokens`).
    """
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    prompts = [build_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    # Batches of similar lengths pad little: the prompts are answered shortest first, and returned in their order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = tokenizer(
                [prompts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                completions[i] = text
    finally:
        tokenizer.padding_side = padding_side
    return [c.strip() for c in completions]


def score(records: list[dict], completions: list[str], style: str = "hash") -> dict:
    """Exact match of final answers written in `style` (the task's, answers.py): `{"n", "correct", "accuracy",
    "accuracy_interval", "per_problem", "samples"}`: the 95% Wilson interval, each problem's correctness in order (for
    paired tests between models scored on the same problems), the first few samples."""
    samples, per_problem = [], []
    correct = 0
    for record, completion in zip(records, completions, strict=True):
        gold = extract_final_answer(record["answer"], style)
        predicted = extract_final_answer(completion, style)
        ok = gold is not None and answers_match(predicted, gold)
        correct += ok
        per_problem.append(ok)
        samples.append(
            {
                "question": record["question"],
                "gold": gold,
                "predicted": predicted,
                "correct": ok,
                "completion": completion,
            }
        )
    n = len(records)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "accuracy_interval": list(wilson_interval(correct, n)),
        "per_problem": per_problem,
        "samples": samples[:5],
    }


def task_accuracy(
    model, tokenizer, records: list[dict], *, batch_size: int = 16, max_new_tokens: int = 256, style: str = "hash"
) -> dict:
    start = time.perf_counter()
    completions = generate_answers(
        model, tokenizer, [r["question"] for r in records], batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    seconds = time.perf_counter() - start
    # the answers' own tokens (each row's end-of-sequence token and padding are not counted)
    generated = sum(len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"])
    return {**score(records, completions, style), "generated_tokens": generated, "generation_s": seconds}
