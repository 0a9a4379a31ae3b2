"""KL-regularized SFT (--kl_beta): the chunked KL against full logits, its gradient, the two references
(a frozen copy, or the base with LoRA adapters off) and the kl column of a run; tiny models built in the test."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lopt.cli import main
from lopt.config import SFTConfig, parse_config
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.models.lora import add_lora
from lopt.training.loss import chunked_kl_sum
from lopt.training.step import forward_backward
from lopt.training.task_loss import AdaptersDisabled, FrozenStartingModel, KLRegularizedLoss, LossTerms
from tiny_data import SFT_RECORDS, sft_args, write_jsonl
from tiny_models import tiny_batch, tiny_model


def full_kl(hidden, weight, ref_hidden, ref_weight) -> torch.Tensor:
    """KL(p || q) summed over rows, written the plain way: whole logits, torch's kl_div."""
    log_p = F.log_softmax(hidden @ weight.t(), dim=-1)
    log_q = F.log_softmax(ref_hidden @ ref_weight.t(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def test_the_chunked_kl_equals_the_full_logits_kl_in_value_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(37, 16), torch.randn(50, 16)
    chunked = chunked_kl_sum(hidden, weight, ref_hidden, ref_weight, chunk_tokens=8)  # 5 chunks, the last short
    chunked.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = full_kl(hidden, weight, ref_hidden, ref_weight)
    full.backward()
    assert chunked.item() > 0
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-4)
    assert chunked_kl_sum(ref_hidden, ref_weight, ref_hidden, ref_weight).abs().item() < 1e-5  # same model: 0


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_the_kl_term_adds_beta_times_the_gradient_of_the_plain_kl(num_blocks):
    batch = tiny_batch(batch=2, seq=16)
    reference = FrozenStartingModel(tiny_model("llama", 4, seed=0))
    policy = tiny_model("llama", 4, seed=0)
    with torch.no_grad():  # the policy has moved away from its starting weights
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))

    def grads(task_loss) -> tuple[dict[str, torch.Tensor], LocalLearningLM]:
        torch.manual_seed(3)  # the reconstruction heads
        model = LocalLearningLM(tiny_model_copy(policy), num_blocks=num_blocks).train()
        forward_backward(model, [batch], backward="local", task_loss=task_loss)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, model

    beta = 0.5
    with_kl, model = grads(KLRegularizedLoss(beta=beta, reference=reference))
    without_kl, _ = grads(KLRegularizedLoss(beta=0.0, reference=reference))

    # The KL gradient alone, from full logits: final block's hidden states through the untied LM head.
    plain = LocalLearningLM(tiny_model_copy(policy), num_blocks=num_blocks).train()
    keep = batch["labels"][:, 1:] != -100
    with plain.boundary_step(None, 1.0, batch["attention_mask"]):
        hidden = plain.hidden_states(batch["input_ids"], batch["attention_mask"])
    ref_hidden, ref_weight = reference(plain, batch)
    kl = full_kl(hidden[:, :-1][keep], plain.parts.head.weight, ref_hidden[:, :-1][keep], ref_weight)
    (kl / keep.sum()).backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert expected and set(expected) <= set(with_kl)
    for name, grad in expected.items():
        torch.testing.assert_close(with_kl[name] - without_kl[name], beta * grad, atol=2e-6, rtol=1e-3)
    if num_blocks == 2:  # the KL belongs to the task loss: it reaches the final block only
        early = [f"layers.{i}." for i in model.blocks[0]]
        assert not any(layer in name for name in expected for layer in early)


def tiny_model_copy(model: torch.nn.Module) -> torch.nn.Module:
    copy = tiny_model("llama", 4, seed=0)
    copy.load_state_dict(model.state_dict())
    return copy


def test_with_adapters_the_reference_is_the_base_and_the_kl_starts_at_zero():
    batch = tiny_batch(batch=2, seq=16)
    lora = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")
    model = LocalLearningLM(add_lora(tiny_model("llama", 4), lora), num_blocks=2).train()
    loss = KLRegularizedLoss(beta=0.1, reference=AdaptersDisabled())
    with model.boundary_step(None, 1.0, batch["attention_mask"]):
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    terms = loss(model, hidden, batch)
    assert isinstance(terms, LossTerms) and abs(terms.logged["kl"].item()) < 1e-5  # peft starts B at zero
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    moved = loss(model, hidden, batch)
    assert moved.logged["kl"].item() > 1e-4
    torch.testing.assert_close(moved.objective, moved.logged["task_loss"] + 0.1 * moved.logged["kl"])


@pytest.mark.parametrize("extra", [(), ("--use_peft",)], ids=["full", "lora"])
def test_a_kl_run_logs_kl_from_zero_and_trains_like_sft_at_its_first_step(extra, model_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", SFT_RECORDS)
    flags = ("--method", "e2e", "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-2", *extra)
    assert main(["sft", *sft_args(model_dir, train_file, tmp_path / "kl", *flags, "--kl_beta", "0.1")]) == 0
    assert main(["sft", *sft_args(model_dir, train_file, tmp_path / "plain", *flags)]) == 0
    kl_rows = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [row["kl"] for row in plain_rows] == [None] * 3  # the column is there, null when off
    kls = [row["kl"] for row in kl_rows]
    assert abs(kls[0]) < 1e-5 and kls[-1] > 1e-4  # the model starts as its reference, then moves away
    # At step 1 the KL and its gradient are zero, so the logged cross entropy and the update match plain SFT.
    assert math.isclose(kl_rows[0]["task_loss"], plain_rows[0]["task_loss"], rel_tol=1e-5)
    assert math.isclose(kl_rows[1]["task_loss"], plain_rows[1]["task_loss"], rel_tol=1e-4)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--kl_beta", "-0.1"), r"--kl_beta must be >= 0"),
        (("--kl_beta", "0.1", "--liger"), "drop --liger"),
    ],
)
def test_bad_kl_flags_are_refused(flags, message, tmp_path):
    with pytest.raises(LoptError, match=message):
        parse_config(["--output_dir", str(tmp_path), *flags], SFTConfig)
