"""Per-architecture access to the parts LoPT needs: embeddings, decoder layers, final norm, output head.

Everything architecture-specific lives here, so the block wrapper and the recipes never index a
model's attributes themselves. Two layouts cover the supported families:
- Llama-style (`model.model.layers`): Llama, Qwen2, Qwen3, Mistral;
- GPT-2 (`model.transformer.h`, learned position embeddings).
The output head is the causal LM's `lm_head` or, for a reward model (transformers' `...ForSequenceClassification`
with one label, `lopt rm`), its `score` head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lopt.errors import LoptError

LLAMA_STYLE = ("llama", "qwen2", "qwen3", "mistral")
GPT2_STYLE = ("gpt2",)
SUPPORTED_FAMILIES = LLAMA_STYLE + GPT2_STYLE


@dataclass
class ModelParts:
    """Views into a Hugging Face causal LM or reward model (no copies: the modules are the model's own)."""

    backbone: nn.Module  # maps input ids to final, normed hidden states
    embeddings: list[nn.Module]  # token (and, for GPT-2, position) embeddings
    layers: nn.ModuleList  # the decoder layers, in order
    final_norm: nn.Module
    head: nn.Linear  # the LM head (hidden -> vocabulary), or a reward model's score head (hidden -> 1)


def model_parts(model: nn.Module) -> ModelParts:
    """Return the parts of `model`, or raise an error naming the supported families."""
    model_type = getattr(model.config, "model_type", None)
    head = model.score if hasattr(model, "score") else getattr(model, "lm_head", None)
    if model_type in LLAMA_STYLE:
        backbone = model.model
        return ModelParts(backbone, [backbone.embed_tokens], backbone.layers, backbone.norm, head)
    if model_type in GPT2_STYLE:
        backbone = model.transformer
        return ModelParts(backbone, [backbone.wte, backbone.wpe], backbone.h, backbone.ln_f, head)
    raise LoptError(
        f"Model type {model_type!r} ({type(model).__name__}) is not supported by lopt. "
        f"Supported families: {', '.join(SUPPORTED_FAMILIES)}. "
        "Pass one of those with --model_name_or_path (a local folder or hub id), or open an issue for another family."
    )
