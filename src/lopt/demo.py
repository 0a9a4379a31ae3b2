"""`lopt demo`: a short LoPT SFT of the embedded SmolLM2-135M on gsm-symbolic, on any machine.

It trains with the same code path as `lopt sft`, reloads the saved folder with plain
`AutoModelForCausalLM` (so the result is shown from the checkpoint a user would ship), and prints
a summary plus one greedy answer to a held-out question before and after training.
"""

from __future__ import annotations

import argparse

import torch
from rich.table import Table
from transformers import AutoModelForCausalLM

from lopt.config import SFTConfig, validate
from lopt.data.collate import build_prompt
from lopt.data.presets import gsm_symbolic_records
from lopt.models.registry import DEFAULT_MODEL, load_model_and_tokenizer
from lopt.training.sft import console, run_sft

HELD_OUT_SEED = 10_000  # the demo question's seed; training uses --seed


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    prompt = build_prompt(tokenizer, [{"role": "user", "content": question}])
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _held_out_question(training_questions: set[str]) -> dict:
    # reasoning-gym seeds are not disjoint, so pick the first question training did not see.
    return next(r for r in gsm_symbolic_records(50, HELD_OUT_SEED) if r["question"] not in training_questions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lopt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--max_seq_length", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--learning_rate", type=float, default=5e-5, help="learning rate (default: 5e-5)")
    parser.add_argument("--num_blocks", type=int, default=2, help="LoPT blocks k (default: 2)")
    parser.add_argument("--max_new_tokens", type=int, default=160, help="length of the shown answers (default: 160)")
    parser.add_argument("--output_dir", default="outputs/demo", help="run folder, replaced on each demo (default: outputs/demo)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    config = SFTConfig(
        model_name_or_path=DEFAULT_MODEL, method="lopt", num_blocks=args.num_blocks, dataset_preset="gsm-symbolic",
        max_samples=args.steps * args.batch_size, max_seq_length=args.max_seq_length,
        per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.learning_rate,
        warmup_ratio=0.1, logging_steps=5, save_steps=0, seed=args.seed, output_dir=args.output_dir,
        overwrite_output_dir=True,  # the demo's own folder; each demo run replaces the last one's files
    )
    validate(config)
    training = {r["question"] for r in gsm_symbolic_records(config.max_samples, config.seed)}
    example = _held_out_question(training)

    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    before = greedy_answer(model, tokenizer, example["question"], args.max_new_tokens)
    del model
    result = run_sft(config)
    trained = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    after = greedy_answer(trained, tokenizer, example["question"], args.max_new_tokens)

    table = Table(title=f"lopt demo: LoPT k={args.num_blocks} SFT of SmolLM2-135M-Instruct on gsm-symbolic")
    table.add_column("what")
    table.add_column("value")
    table.add_row("steps x batch x max tokens", f"{result.steps} x {args.batch_size} x {args.max_seq_length}")
    table.add_row("task loss first -> last", f"{result.first_loss:.4f} -> {result.last_loss:.4f}")
    table.add_row("training time", f"{result.elapsed_s:.1f} s")
    table.add_row("peak activation memory (saved for backward)", f"{result.activation_peak_bytes / 2**20:.1f} MiB")
    table.add_row("peak process memory", f"{result.peak_mem_bytes / 2**20:.1f} MiB")
    table.add_row("model (plain HF checkpoint)", str(result.output_dir))
    console.print(table)
    console.print(f"[bold]held-out question[/] (expected answer {example['answer'].splitlines()[-1]}):\n{example['question']}")
    console.print(f"\n[bold]before training[/]:\n{before}\n\n[bold]after training[/]:\n{after}")
