"""Drift measures (token KL, perplexities, per-layer CKA, per-layer weight change) on tiny random Llamas built in
the test."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lopt.evaluation.drift import drift, layer_weight_change, linear_cka
from lopt.evaluation.retention import perplexity
from tiny_models import VOCAB, tiny_model

LAYERS = 3


@pytest.fixture(scope="module")
def reference():
    return tiny_model("llama", LAYERS)


@pytest.fixture(scope="module")
def windows():
    # 5 windows with batch_size=2 below: the last batch is partial
    return torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def perturbed(reference):
    """The reference with noise added to the weights of decoder layer 2 only."""
    model = copy.deepcopy(reference)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers[2].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_identical_models(reference, windows):
    model = tiny_model("llama", LAYERS)  # same seed: same weights, separate modules
    measured = drift(model, reference, windows, batch_size=2)
    assert abs(measured.kl) < 1e-6
    assert measured.layer_cka == pytest.approx([1.0] * LAYERS, abs=1e-6)
    assert measured.perplexity == pytest.approx(measured.reference_perplexity, rel=1e-6)
    assert layer_weight_change(model, reference) == [0.0] * LAYERS


def test_change_in_one_layer(reference, perturbed, windows):
    change = layer_weight_change(perturbed, reference)
    assert change[:2] == [0.0, 0.0] and change[2] > 0
    measured = drift(perturbed, reference, windows, batch_size=2)
    assert measured.kl > 1e-4
    cka = measured.layer_cka
    assert cka[:2] == pytest.approx([1.0, 1.0], abs=1e-6)  # layers before the change see the same inputs
    assert cka[2] < 1 - 1e-3


def test_kl_matches_direct_computation(reference, perturbed, windows):
    window = windows[:1]
    with torch.no_grad():
        p = reference(input_ids=window).logits[0].double().softmax(-1)
        q = perturbed(input_ids=window).logits[0].double().softmax(-1)
    direct = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert drift(perturbed, reference, window).kl == pytest.approx(direct, rel=1e-4)
    # KL is not symmetric: swapping the models measures the other direction
    assert drift(reference, perturbed, window).kl != pytest.approx(direct, rel=1e-4)


def test_perplexities_match_the_retention_measure(reference, perturbed, windows):
    measured = drift(perturbed, reference, windows, batch_size=2)
    assert measured.perplexity == pytest.approx(perplexity(perturbed, windows, batch_size=3), rel=1e-5)
    assert measured.reference_perplexity == pytest.approx(perplexity(reference, windows), rel=1e-5)
    assert math.isfinite(measured.perplexity) and measured.perplexity != measured.reference_perplexity


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = x @ torch.randn(16, 8, generator=g) + 0.5 * torch.randn(200, 8, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ torch.linalg.qr(torch.randn(16, 16, generator=g))[0]) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * y @ rotation) == pytest.approx(linear_cka(x, y), rel=1e-5)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    assert linear_cka(x, torch.randn(200, 8, generator=g)) < 0.5
    with pytest.raises(ValueError, match="200 rows, y has 100"):
        linear_cka(x, y[:100])


def test_hidden_states_are_kept_for_the_first_max_tokens_only(reference, perturbed, windows):
    # The first window (16 tokens) is identical in both capped runs; CKA over fewer tokens differs from the full one.
    full = drift(perturbed, reference, windows, batch_size=2, max_tokens=None).layer_cka
    first_window = drift(perturbed, reference, windows[:1], max_tokens=None).layer_cka
    assert drift(perturbed, reference, windows, batch_size=1, max_tokens=16).layer_cka == pytest.approx(first_window)
    assert drift(perturbed, reference, windows, batch_size=2, max_tokens=20).layer_cka != pytest.approx(full)


def test_weight_change_of_merged_lora(reference):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[1], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(reference), config)
    with pytest.raises(ValueError, match="lora_A"):  # unmerged, the layer holds the adapter's parameters too
        layer_weight_change(peft_model, reference)
    change = layer_weight_change(peft_model.merge_and_unload(), reference)
    assert change[0] == 0.0 and change[1] > 0 and change[2] == 0.0


def test_mismatched_models(reference):
    with pytest.raises(ValueError, match="2 decoder layers, the reference 3"):
        layer_weight_change(tiny_model("llama", 2), reference)
    with pytest.raises(ValueError, match="q_norm"):  # Qwen3 normalizes queries and keys; Llama does not
        layer_weight_change(tiny_model("qwen3", LAYERS), reference)
