"""`lopt merge ADAPTER_DIR --out DIR`: a LoRA adapter folder folded into its base model, saved as a plain checkpoint.

The result loads with `AutoModelForCausalLM.from_pretrained(DIR)` and needs neither peft nor the base model
any more; it is what `--merge_lora` writes at the end of a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lopt.errors import LoptError
from lopt.models.lora import ADAPTER_CONFIG, is_adapter_folder
from lopt.models.registry import load_model_and_tokenizer
from lopt.output import console, phase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lopt merge",
        description="Merge a LoRA adapter folder (a run's --output_dir with --use_peft, or any peft adapter) into its "
        "base model and save a plain Hugging Face checkpoint.",
    )
    parser.add_argument("adapter_dir", help=f"folder with {ADAPTER_CONFIG} and the adapter weights")
    parser.add_argument("--out", required=True, help="folder to write the merged model and tokenizer into")
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="dtype of the merged weights (default: float32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into --out even when it is not empty")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    adapter, out = Path(args.adapter_dir).expanduser(), Path(args.out).expanduser()
    if not is_adapter_folder(adapter):
        found = (
            "holds a full model (config.json), nothing to merge"
            if (adapter / "config.json").is_file()
            else (f"has no {ADAPTER_CONFIG}" if adapter.is_dir() else "does not exist")
        )
        raise LoptError(
            f"ADAPTER_DIR {adapter} {found}. Pass the --output_dir of a run trained with --use_peft (without "
            "--merge_lora), or a folder saved by peft's save_pretrained."
        )
    if out.resolve() == adapter.resolve():
        raise LoptError(f"--out {out} is the adapter folder itself; pass another folder so the adapter is kept.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise LoptError(f"--out {out} is not empty; pass a new folder, or --overwrite to replace files in it.")
    model, tokenizer = load_model_and_tokenizer(str(adapter), dtype=DTYPES[args.dtype], what="ADAPTER_DIR")
    with phase(f"saving the merged model to {out}"):
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    console.print(f"merged {adapter} into its base model: {out} (load it with AutoModelForCausalLM.from_pretrained)")
