"""LoRA / QLoRA's flags (adapters through peft, models/lora.py) and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from lopt.config.fields import option
from lopt.errors import LoptError

ADAPTER_FLAGS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "load_in_4bit",
    "load_in_8bit",
    "merge_lora",
)


@dataclass
class AdapterFlags:
    use_peft: bool = option(
        False,
        "train LoRA adapters instead of the weights (base model frozen, embeddings and LM head included); with "
        "--method lopt every block's adapters learn from that block's objective",
    )
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the adapters' input")
    lora_target_modules: str = option(
        "all-linear",
        "modules that get adapters: all-linear (every linear layer of attention and MLP, not the LM head) or "
        "comma-separated names, e.g. q_proj,v_proj",
    )
    load_in_4bit: bool = option(False, "QLoRA: load the frozen base in 4-bit NF4 with bitsandbytes (CUDA only)")
    load_in_8bit: bool = option(False, "load the frozen base in 8-bit with bitsandbytes (CUDA only)")
    merge_lora: bool = option(
        False, "save the final model with the adapters merged in (a plain checkpoint) instead of the adapter folder"
    )


def validate_adapters(config) -> None:
    if not config.use_peft:
        given = [f"--{name}" for name in ADAPTER_FLAGS if name in config.explicit and getattr(config, name)]
        if given:
            raise LoptError(f"{', '.join(given)} configure LoRA adapters; add --use_peft, or drop them.")
        return
    from lopt.models.lora import target_modules  # here: only --use_peft needs it

    if config.lora_r < 1 or config.lora_alpha <= 0:
        raise LoptError(
            f"--lora_r must be at least 1 and --lora_alpha above 0, got {config.lora_r} and {config.lora_alpha}."
        )
    if not 0 <= config.lora_dropout < 1:
        raise LoptError(f"--lora_dropout must be in [0, 1), got {config.lora_dropout}.")
    if config.load_in_4bit and config.load_in_8bit:
        raise LoptError("--load_in_4bit and --load_in_8bit are exclusive; pass one.")
    target_modules(config.lora_target_modules)
