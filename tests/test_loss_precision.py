"""The chunked LM-head cross entropy is as accurate as plain float32 cross entropy, chunk size aside.

Reference: the same loss and gradients computed in float64 from the same float32 inputs. The yardstick is
plain float32 `F.cross_entropy(hidden @ weight.T)`: the chunked loss must be no more than twice its error.
A 49152-token vocabulary makes the one-row products long enough for the accumulation error to show: before
the fix, a chunk holding a single token (chunk=1, or the last chunk of 64 tokens at chunk 21 or 63) had its
hidden-gradient row about 2e-6 off against plain float32's 3e-7 to 7e-7.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lopt.training.loss import _ChunkedLinearCrossEntropy

TOKENS, HIDDEN, VOCAB = 64, 64, 49152


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


def _worst_row_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((value.double() - reference).norm(dim=1) / reference.norm(dim=1)).max())


def _loss_and_grads(loss_fn, hidden: torch.Tensor, weight: torch.Tensor):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.fixture(scope="module")
def problem():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * (2 / HIDDEN**0.5)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)

    def plain(h, w):
        return F.cross_entropy(h @ w.t(), labels, reduction="sum")

    reference = _loss_and_grads(plain, hidden.double(), weight.double())
    float32 = _loss_and_grads(plain, hidden, weight)
    return hidden, weight, labels, reference, float32


@pytest.mark.parametrize("chunk", [1024, 24, 21, 63, 1], ids=lambda c: f"chunk{c}")
def test_chunked_loss_gradients_are_as_accurate_as_plain_float32(problem, chunk):
    """1024: one chunk; 24: a partial last chunk; 21 and 63: a last chunk of one token; 1: every chunk one token."""
    hidden, weight, labels, (ref_loss, ref_grad_hidden, ref_grad_weight), (_, plain_grad_hidden, plain_grad_weight) = (
        problem
    )
    loss, grad_hidden, grad_weight = _loss_and_grads(
        lambda h, w: _ChunkedLinearCrossEntropy.apply(h, w, labels, chunk), hidden, weight
    )

    assert abs(float(loss) / float(ref_loss) - 1) <= 1e-6
    assert _relative_error(grad_hidden, ref_grad_hidden) <= 2 * _relative_error(plain_grad_hidden, ref_grad_hidden)
    assert _relative_error(grad_weight, ref_grad_weight) <= 2 * _relative_error(plain_grad_weight, ref_grad_weight)
    # Per token too: a single badly accumulated row barely moves the norm over 64 rows.
    assert _worst_row_error(grad_hidden, ref_grad_hidden) <= 2 * _worst_row_error(plain_grad_hidden, ref_grad_hidden)


@pytest.mark.parametrize("chunk", [21, 1], ids=lambda c: f"chunk{c}")
def test_chunked_loss_keeps_bf16_gradients_in_bf16(problem, chunk):
    hidden, weight, labels, _, _ = problem
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    reference = _loss_and_grads(
        lambda h, w: F.cross_entropy(h @ w.t(), labels, reduction="sum"), hidden.double(), weight.double()
    )
    loss, grad_hidden, grad_weight = _loss_and_grads(
        lambda h, w: _ChunkedLinearCrossEntropy.apply(h, w, labels, chunk), hidden, weight
    )

    assert loss.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    assert abs(float(loss) / float(reference[0]) - 1) <= 1e-3  # the logits come out of the matmul in bf16
    assert _relative_error(grad_hidden, reference[1]) <= 1e-2  # bf16 rounding of the gradient: 2**-9
    assert _relative_error(grad_weight, reference[2]) <= 1e-2
