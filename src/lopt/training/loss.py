"""Causal-LM cross entropy without materializing [batch, seq, vocab] logits.

Only positions with a label are kept, and the LM head is applied to them in chunks of tokens. The
backward recomputes each chunk's logits instead of storing them, so the loss holds at most one
chunk of float32 logits at a time, never the whole batch's (a 150k vocabulary at 4 x 1024 tokens is
2.4 GB of float32 logits; one 1024-token chunk is 0.6 GB, and only while it is being used).

On CUDA, `--liger` swaps the chunked kernel for Liger Kernel's fused linear cross entropy (Triton),
which also never holds the full logits and is faster there; it is optional (`pip install liger-kernel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lopt.data.collate import IGNORE_INDEX
from lopt.errors import LoptError

DEFAULT_CHUNK_TOKENS = 1024
_SINGLE_ROW_VOCAB_BLOCK = 1024  # vocabulary rows per partial product when a chunk holds one token


def _grad_hidden_rows(grad_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`grad_logits @ weight` in float32, as accurate for a one-token chunk as for a full one.

    A one-row product (chunk=1, or a last chunk left with a single token) is a matrix-vector product, and the
    BLAS gemv it dispatches to (MKL on CPU; bit-identical to `torch.mv(weight.t(), row)`) accumulates the whole
    vocabulary in one running float32 sum per output. Measured on CPU at a 49152 vocabulary: 2e-6 relative error
    per row against float64, where the matrix-matrix product of a full chunk (and of plain F.cross_entropy) is at
    2e-7 to 4e-7; with chunk=1 that made the hidden gradient 5x worse than plain float32 cross entropy's. Summing
    the product over blocks of 1024 vocabulary rows bounds each running sum and measured 1.8e-7 for that row.
    """
    if grad_logits.shape[0] != 1:
        return grad_logits @ weight.float()
    rows = grad_logits.new_zeros(1, weight.shape[1])
    for start in range(0, weight.shape[0], _SINGLE_ROW_VOCAB_BLOCK):
        end = start + _SINGLE_ROW_VOCAB_BLOCK
        rows += grad_logits[:, start:end] @ weight[start:end].float()
    return rows


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, labels), computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start : start + chunk] @ weight.t()).float()
            total += F.cross_entropy(logits, labels[start : start + chunk], reduction="sum")
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start : start + ctx.chunk]
            # d(sum CE)/d logits = softmax(logits) - one_hot(label)
            grad_logits = torch.softmax((h @ weight.t()).float(), dim=-1)
            grad_logits[torch.arange(h.shape[0], device=h.device), labels[start : start + ctx.chunk]] -= 1.0
            grad_logits *= grad_total
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.chunk] = _grad_hidden_rows(grad_logits, weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def liger_linear_cross_entropy(device: torch.device):
    """Liger Kernel's fused linear cross entropy (summed), or a LoptError saying why it cannot run."""
    if device.type != "cuda":
        raise LoptError(
            f"--liger needs a CUDA GPU (Liger Kernel is Triton code); this run is on {device.type}. "
            "Drop --liger: the default chunked loss also never holds the full logits."
        )
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        raise LoptError(
            f"--liger needs Liger Kernel ({error}). Install it with `pip install liger-kernel`, "
            "or drop --liger to use the default chunked loss."
        ) from error
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss_sum(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    liger: bool = False,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over labelled positions, and the number of those positions.

    `hidden` is [batch, seq, hidden] (the LM head's input), `labels` is [batch, seq] with IGNORE_INDEX where
    no loss applies. The caller divides by the token count of the whole accumulation window.
    """
    if lm_head.bias is not None:
        raise ValueError("causal_lm_loss_sum supports LM heads without bias (all supported families)")
    shifted_labels = labels[:, 1:]
    keep = shifted_labels != IGNORE_INDEX
    trained_hidden = hidden[:, :-1][keep]
    trained_labels = shifted_labels[keep]
    n_tokens = int(trained_labels.numel())
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected so every process runs the same backward
    if liger:
        loss = liger_linear_cross_entropy(hidden.device)(lm_head.weight, trained_hidden, trained_labels).float()
    else:
        loss = _ChunkedLinearCrossEntropy.apply(trained_hidden, lm_head.weight, trained_labels, chunk_tokens)
    return loss, n_tokens


def _kl_rows(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor):
    """sum over rows of KL(softmax(hidden @ weight.T) || softmax(ref_hidden @ ref_weight.T)), in float32."""
    log_p = F.log_softmax((hidden @ weight.t()).float(), dim=-1)
    log_q = F.log_softmax((ref_hidden @ ref_weight.t()).float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def chunked_kl_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Summed KL(model || reference) of the next-token distributions at `hidden`'s rows ([tokens, hidden]).

    Each chunk runs under activation checkpointing: its two [chunk, vocab] logit tensors exist only
    while the chunk is computed, in forward and again in backward, never for the whole batch at once.
    """
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        total = total + checkpoint(_kl_rows, hidden[rows], weight, ref_hidden[rows], ref_weight, use_reentrant=False)
    return total
