"""Drift: where a fine-tuned model changed relative to the model it started from.

Three views, from the outside in: the next-token distributions (KL), the representations each decoder layer
produces (CKA) and each decoder layer's weights (relative change). `windows` is a LongTensor
[num_windows, window_len] of token ids, e.g. from `retention.token_windows`; models are Hugging Face causal LMs
in eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Drift:
    """How far `model` moved from `reference` on the same general text (one paired pass over it)."""

    kl: float  # mean over every position of KL(reference || model) between next-token distributions, nats
    perplexity: float  # the model's, on every predicted token of every window
    reference_perplexity: float
    layer_cka: list[float]  # linear CKA per decoder layer between the two models' hidden states (1: unchanged)


@torch.no_grad()
def drift(model, reference, windows: torch.Tensor, batch_size: int = 8, max_tokens: int | None = 4096) -> Drift:
    """KL, both perplexities and per-layer CKA from one forward of each model per batch.

    KL is the most direct measure of how far the output distribution moved: it weighs each token by the probability
    the reference gave it and is 0 only where the two agree. Every position predicts a next token, the last of a
    window included (no target is needed); perplexity counts the positions that have a target. Hidden states are
    kept for the first `max_tokens` tokens (all if None), which bounds memory at 2 x layers x max_tokens x hidden.
    Both models run on the device of `model`'s first parameter.
    """
    device = next(model.parameters()).device
    total_kl, positions, nll, reference_nll, targets = 0.0, 0, 0.0, 0.0, 0
    states, reference_states, kept = [], [], 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        out = model(input_ids=batch, output_hidden_states=True)
        reference_out = reference(input_ids=batch, output_hidden_states=True)
        # float32 log_softmax: half-precision logits lose the small probabilities that KL sums over
        log_q, log_p = F.log_softmax(out.logits.float(), -1), F.log_softmax(reference_out.logits.float(), -1)
        total_kl += F.kl_div(log_q, log_p, reduction="sum", log_target=True).item()  # sum p (log p - log q)
        positions += batch.numel()
        next_tokens = batch[:, 1:].unsqueeze(-1)
        nll -= log_q[:, :-1].gather(-1, next_tokens).sum().item()
        reference_nll -= log_p[:, :-1].gather(-1, next_tokens).sum().item()
        targets += next_tokens.numel()
        if max_tokens is None or kept < max_tokens:
            states.append(_flat(out.hidden_states))
            reference_states.append(_flat(reference_out.hidden_states))
            kept += batch.numel()
    xs, ys = _by_layer(states, max_tokens), _by_layer(reference_states, max_tokens)
    if len(xs) != len(ys):
        raise ValueError(f"the model has {len(xs)} decoder layers, the reference {len(ys)}")
    return Drift(
        kl=total_kl / positions,
        perplexity=math.exp(nll / targets),
        reference_perplexity=math.exp(reference_nll / targets),
        layer_cka=[linear_cka(x, y) for x, y in zip(xs, ys, strict=True)],
    )


def _flat(hidden_states: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Each decoder layer's output as float32 CPU [tokens, hidden] (Hugging Face's hidden_states[1:]: no embeddings;
    the last layer's entry is taken after the final norm)."""
    return [h.reshape(-1, h.shape[-1]).float().cpu() for h in hidden_states[1:]]


def _by_layer(batches: list[list[torch.Tensor]], max_tokens: int | None) -> list[torch.Tensor]:
    return [torch.cat(layer)[:max_tokens] for layer in zip(*batches, strict=True)]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between feature matrices x [n, d1] and y [n, d2] of the same n inputs.

    1 for identical representations, and invariant to orthogonal transforms and isotropic scaling: it compares
    representations up to rotation and scale, so values are comparable across layers and models. float64 because
    the Frobenius norms square large sums.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same inputs for both: x has {x.shape[0]} rows, y has {y.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    norm = torch.linalg.matrix_norm  # Frobenius
    return (norm(y.T @ x) ** 2 / (norm(x.T @ x) * norm(y.T @ y))).item()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The nn.ModuleList of the model's config.num_hidden_layers blocks (`model.layers`, GPT-2's `transformer.h`...).

    Found by shape rather than by attribute path, so any family works, and so does a PEFT-merged model.
    """
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(model).__name__} has no nn.ModuleList of its {count} decoder layers")


@torch.no_grad()
def layer_weight_change(model: nn.Module, reference: nn.Module) -> list[float]:
    """Per decoder layer, ||W - W0|| / ||W0||: Frobenius norms over all of the layer's parameters concatenated.

    Shows where a method put its updates (e.g. LoPT's blocks vs E2E's whole depth), independently of the data.
    """
    layers, reference_layers = _decoder_layers(model), _decoder_layers(reference)
    if len(layers) != len(reference_layers):
        raise ValueError(f"the model has {len(layers)} decoder layers, the reference {len(reference_layers)}")
    changes = []
    for i, (layer, reference_layer) in enumerate(zip(layers, reference_layers, strict=True)):
        params, reference_params = dict(layer.named_parameters()), dict(reference_layer.named_parameters())
        if params.keys() != reference_params.keys():
            only_model = sorted(params.keys() - reference_params.keys())
            only_reference = sorted(reference_params.keys() - params.keys())
            raise ValueError(
                f"decoder layer {i} has different parameters: only in the model {only_model}, "
                f"only in the reference {only_reference}"
            )
        diff_sq, base_sq = 0.0, 0.0
        for name, w in params.items():
            w0 = reference_params[name].to(device=w.device, dtype=torch.float32)
            if w.shape != w0.shape:  # else the subtraction could broadcast silently
                raise ValueError(
                    f"decoder layer {i} {name}: shape {tuple(w.shape)} in the model, {tuple(w0.shape)} in the reference"
                )
            diff_sq += (w.float() - w0).square().sum().item()
            base_sq += w0.square().sum().item()
        changes.append((diff_sq / base_sq) ** 0.5)
    return changes
