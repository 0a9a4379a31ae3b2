"""Task accuracy: greedy answers to a task's held-out problems (lopt/tasks.py), scored by their final answer.

Questions are prompted exactly as SFT trains on them (`build_prompt` over the question followed by
the task's answer instruction), so a fine-tuned model is asked in the format it learned. The final
answer is read with `lopt.answers`, the parser the rewards use, from both the generation and the
reference solution, in the task's answer style (gsm-symbolic and GSM8K: `#### <answer>`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lopt.answers import answers_match, extract_final_answer
from lopt.data.collate import build_prompt
from lopt.data.generated import DEFAULT_GSM_SAMPLES, gsm_symbolic_records
from lopt.tasks import get_task


def training_questions(run_dir: Path) -> set[str]:
    """The gsm-symbolic questions a run trained on, rebuilt from its training_args.json (empty if none)."""
    args_file = run_dir / "training_args.json"
    if not args_file.is_file():
        return set()
    args = json.loads(args_file.read_text())
    if args.get("train_file") or args.get("dataset_name") or args.get("dataset_preset") != "gsm-symbolic":
        return set()
    size = args.get("max_samples") or DEFAULT_GSM_SAMPLES
    return {record["question"] for record in gsm_symbolic_records(size, args.get("seed", 42))}


def load_task(task: str, n: int, exclude: set[str]) -> list[dict]:
    """`n` held-out problems of `task` (lopt/tasks.py), none of them in `exclude`."""
    return get_task(task, evaluable=True).heldout(n, exclude)


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy completions of the training-format prompts, in batches padded on the left.

    Left padding puts every prompt's last token at the same position, so all rows of a batch start
    generating at once; the pad tokens are masked out of attention.
    """
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    completions = []
    try:
        for start in range(0, len(questions), batch_size):
            prompts = [
                build_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions[start : start + batch_size]
            ]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return [c.strip() for c in completions]


def score(records: list[dict], completions: list[str], style: str = "hash") -> dict:
    """Exact match of final answers written in `style` (the task's, answers.py): `{"n", "correct",
    "accuracy", "samples"}` (samples: the first few)."""
    samples = []
    correct = 0
    for record, completion in zip(records, completions, strict=True):
        gold = extract_final_answer(record["answer"], style)
        predicted = extract_final_answer(completion, style)
        ok = gold is not None and answers_match(predicted, gold)
        correct += ok
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
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "samples": samples[:5]}


def task_accuracy(
    model, tokenizer, records: list[dict], *, batch_size: int = 16, max_new_tokens: int = 256, style: str = "hash"
) -> dict:
    completions = generate_answers(
        model, tokenizer, [r["question"] for r in records], batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    return score(records, completions, style)
