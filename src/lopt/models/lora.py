"""LoRA adapters through the `peft` library: adding them for training, saving, loading and merging them.

lopt puts the adapters on the model itself (`get_peft_model`) before the LoPT block wrapper is built,
for every recipe, rather than handing TRL a `peft_config`: the wrapper's boundary hooks then sit on
the adapted decoder layers, so each block's adapters learn from that block's objective (the early
blocks' from their reconstruction losses, the final block's from the task loss), and TRL receives a
`PeftModel`, which it trains as it would one it had wrapped (its DPO and GRPO reference model is the
same model with the adapters disabled, at no extra weights).

Under LoRA every weight of the base model is frozen, embeddings and LM head included (peft's default,
and what LoRA users expect); the reconstruction heads of LoPT stay full-rank and trainable, since they
are training-only and never saved. A run with adapters saves peft's adapter folder
(`adapter_config.json`, `adapter_model.safetensors`) or, with `--merge_lora`, a plain merged
checkpoint.

QLoRA (`--load_in_4bit` / `--load_in_8bit`) loads the base weights through bitsandbytes, which needs
a CUDA GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lopt.errors import LoptError

if TYPE_CHECKING:  # imported where used: `lopt report` reads adapter folders without loading torch
    import torch
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"  # peft's name for every linear layer of the decoder (the LM head excluded)


def is_adapter_folder(path: str | Path) -> bool:
    """A peft adapter folder (adapter_config.json, no model config of its own)."""
    folder = Path(path).expanduser()
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base_model(folder: str | Path) -> str:
    """The base model an adapter folder was trained on, as recorded in its adapter_config.json."""
    config_file = Path(folder).expanduser() / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise LoptError(
            f"{config_file}: unreadable adapter config ({error}); re-save the adapter with peft."
        ) from error
    if not base:
        raise LoptError(
            f"{config_file} names no base_model_name_or_path, so lopt cannot tell which model the adapter belongs "
            "to. Add the base model's hub id or folder to that key."
        )
    return base


def target_modules(spec: str) -> str | list[str]:
    """`--lora_target_modules`: 'all-linear' or comma-separated module names (q_proj,v_proj)."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise LoptError("--lora_target_modules is empty; pass all-linear or module names such as q_proj,v_proj.")
    if "lm_head" in names:
        # The task loss reads the LM head's weight directly, chunk by chunk (training/loss.py), so an
        # adapter on it would never see a gradient: refused rather than silently untrained.
        raise LoptError(
            "--lora_target_modules: lm_head cannot carry an adapter in lopt (the task loss reads its weight "
            "directly, without full logits); leave it out, e.g. --lora_target_modules all-linear."
        )
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def add_lora(model: torch.nn.Module, config) -> PeftModel:
    """Freeze `model` and add trainable LoRA adapters as `config` (--lora_*) says."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # peft names the module it could not find
        raise LoptError(
            f"--lora_target_modules {config.lora_target_modules}: {error}. Pass all-linear or names of the model's "
            "linear layers (Llama-style: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; GPT-2: "
            "c_attn,c_proj,c_fc)."
        ) from error


def load_adapter(model: torch.nn.Module, folder: str | Path, trainable: bool) -> PeftModel:
    """`model` with the adapter saved in `folder` (to go on training it, or for inference)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_parameters(model: PeftModel) -> int:
    """How many parameters the adapters add (what a LoRA run trains)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, device: torch.device, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for QLoRA, or None; refuses where bitsandbytes cannot run."""
    if not (load_in_4bit or load_in_8bit):
        return None
    flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
    if load_in_4bit and load_in_8bit:
        raise LoptError("--load_in_4bit and --load_in_8bit are exclusive; pass one.")
    if device.type != "cuda":
        raise LoptError(
            f"{flag} (QLoRA) quantizes the base weights with bitsandbytes, which needs a CUDA GPU; this run is on "
            f"{device.type}. Drop {flag} and train LoRA adapters on the full-precision base (--use_peft), or run on a "
            "CUDA machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise LoptError(f"{flag} needs bitsandbytes ({error}): `pip install bitsandbytes`.") from error
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def merged(model: PeftModel) -> torch.nn.Module:
    """The base model with the adapters' weights added in: a plain transformers model."""
    return model.merge_and_unload()
