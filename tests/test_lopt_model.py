"""The LoPT block wrapper and the training step, on tiny random models of every supported family."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel

from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM, ReconstructionHead, split_blocks
from lopt.training import loss as loss_module
from lopt.training.loss import causal_lm_loss_sum
from lopt.training.memory import SavedTensorMeter
from lopt.training.optim import build_optimizer
from lopt.training.step import StepResult, check_finite, forward_backward
from tiny_models import FAMILIES, tiny_batch, tiny_model


def wrap(model, num_blocks=2, lambda_aux=10.0, seed=123):
    torch.manual_seed(seed)  # the heads' initialization
    return LocalLearningLM(copy.deepcopy(model), num_blocks=num_blocks, lambda_aux=lambda_aux).train()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_blocks_sizes_differ_by_at_most_one_extra_layers_first():
    assert [len(b) for b in split_blocks(30, 4)] == [8, 8, 7, 7]
    assert [len(b) for b in split_blocks(30, 2)] == [15, 15]
    assert [len(b) for b in split_blocks(7, 3)] == [3, 2, 2]
    blocks = split_blocks(10, 3)
    assert [i for b in blocks for i in b] == list(range(10))


@pytest.mark.parametrize("k", [0, 5])
def test_split_blocks_out_of_range_names_the_flag_and_range(k):
    with pytest.raises(LoptError, match=r"--num_blocks .* from 2 to 4"):
        split_blocks(4, k)


def test_unsupported_family_names_supported_ones():
    model = BertLMHeadModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    with pytest.raises(LoptError, match="llama, qwen2, qwen3, mistral, gpt2"):
        LocalLearningLM(model, num_blocks=2)


def test_reconstruction_head_shape_and_init():
    head = ReconstructionHead(32)
    layers = list(head.net)
    assert [type(m).__name__ for m in layers] == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert layers[1].weight.shape == (8, 32) and layers[3].weight.shape == (32, 8)
    bound = 0.1 * (6 / (32 + 8)) ** 0.5  # xavier-uniform bound with gain 0.1
    for linear in (layers[1], layers[3]):
        assert linear.weight.abs().max() <= bound + 1e-7
        assert torch.count_nonzero(linear.bias) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapping_changes_no_logit(family):
    base = tiny_model(family)
    batch = tiny_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = base(**inputs).logits
    wrapped = wrap(base, num_blocks=3).eval()
    with torch.no_grad():
        got = wrapped(**inputs).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    with torch.enable_grad():  # the boundaries detach under grad, still without changing a value
        got = wrapped(**inputs).logits
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    # without padding too
    with torch.no_grad():
        torch.testing.assert_close(
            wrapped(input_ids=batch["input_ids"][:1]).logits,
            base(input_ids=batch["input_ids"][:1]).logits,
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_task_loss_gives_zero_gradient_to_non_final_blocks(family):
    model = wrap(tiny_model(family), num_blocks=2, lambda_aux=0.0)
    forward_backward(model, [tiny_batch()], backward="local")
    groups = model.parameter_groups()
    early = [p for p in groups["early"] if not any(p is h for h in model.aux_heads.parameters())]
    assert early, "the early group must hold the embeddings and the first block"
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in early)
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in groups["final"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_blocks", [2, 3])
def test_local_and_joint_backward_give_equal_gradients(family, num_blocks):
    base = tiny_model(family, layers=4)
    window = [tiny_batch(seed=1), tiny_batch(seed=2)]  # gradient accumulation over two micro-batches
    results = {}
    for mode in ("local", "joint"):
        model = wrap(base, num_blocks=num_blocks)
        results[mode] = (forward_backward(model, window, backward=mode), grads(model))
    (local_result, local_grads), (joint_result, joint_grads) = results["local"], results["joint"]
    assert local_result.task_loss == pytest.approx(joint_result.task_loss, abs=1e-6)
    assert local_result.aux_losses == pytest.approx(joint_result.aux_losses, abs=1e-6)
    assert local_grads.keys() == joint_grads.keys()
    assert any(name.startswith("aux_heads") for name in local_grads)
    for name in local_grads:
        torch.testing.assert_close(local_grads[name], joint_grads[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backward", ["local", "joint"])
def test_gradient_checkpointing_keeps_gradients(backward):
    base = tiny_model("llama")
    plain = wrap(base)
    forward_backward(plain, [tiny_batch()], backward=backward)
    checkpointed = wrap(base)
    checkpointed.enable_gradient_checkpointing()
    forward_backward(checkpointed, [tiny_batch()], backward=backward)
    expected = grads(plain)
    for name, grad in grads(checkpointed).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5)


def test_objective_matches_hand_computed_loss():
    """task CE (token mean) + lambda * mean over blocks of MSE(head(out), in) over real (unpadded) tokens."""
    base = tiny_model("llama", layers=4)
    batch = tiny_batch()
    model = wrap(base, num_blocks=2, lambda_aux=10.0)
    result = forward_backward(model, [batch], backward="joint")
    with torch.no_grad():
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        task = F.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        block_in, block_out = out.hidden_states[0], out.hidden_states[2]
        per_token = (model.aux_heads[0](block_out) - block_in).pow(2).mean(-1)
        real = batch["attention_mask"].bool()
        aux = per_token[real].mean()
        assert not torch.isclose(aux, per_token.mean())  # the batch has padding, so the mask matters
    assert result.task_loss == pytest.approx(float(task), abs=1e-5)
    assert result.aux_losses[0] == pytest.approx(float(aux), abs=1e-6)


def test_chunked_loss_equals_full_logits_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=False)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = -100
    loss_sum, n = causal_lm_loss_sum(hidden, head, labels, chunk_tokens=4)  # several chunks
    loss_sum.backward()
    got_h, got_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    expected = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), reduction="sum")
    expected.backward()
    assert n == int((labels[:, 1:] != -100).sum())
    assert float(loss_sum.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    torch.testing.assert_close(got_h, hidden.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_w, head.weight.grad, atol=1e-6, rtol=1e-5)


def test_liger_loss_gets_weight_hidden_and_labels_in_liger_order(monkeypatch):
    """No CUDA here: a stand-in with Liger's call signature (weight, input, target) checks the wiring."""
    calls = []

    def fake_liger(device):
        def loss_fn(weight, inputs, target):
            calls.append((device.type, weight.shape, inputs.shape, target.shape))
            return F.cross_entropy(inputs @ weight.t(), target, ignore_index=-100, reduction="sum")

        return loss_fn

    monkeypatch.setattr(loss_module, "liger_linear_cross_entropy", fake_liger)
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 9, 16), torch.nn.Linear(16, 40, bias=False)
    labels = torch.randint(0, 40, (2, 9))
    labels[1, :4] = -100
    liger_sum, n = causal_lm_loss_sum(hidden, head, labels, liger=True)
    chunked_sum, _ = causal_lm_loss_sum(hidden, head, labels)
    assert calls == [("cpu", (40, 16), (n, 16), (n,))]
    assert float(liger_sum.detach()) == pytest.approx(float(chunked_sum.detach()), rel=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="Liger Kernel runs on CUDA only, and needs `pip install liger-kernel`",
)
def test_liger_loss_and_gradients_equal_the_chunked_loss_on_cuda():
    torch.manual_seed(0)
    hidden = torch.randn(2, 33, 64, device="cuda", requires_grad=True)
    head = torch.nn.Linear(64, 1000, bias=False, device="cuda")
    labels = torch.randint(0, 1000, (2, 33), device="cuda")
    labels[0, :5] = -100
    results = []
    for liger in (False, True):
        loss, _ = causal_lm_loss_sum(hidden, head, labels, liger=liger)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
        hidden.grad, head.weight.grad = None, None
    for chunked, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, chunked, atol=1e-4, rtol=1e-4)


def test_liger_refuses_cpu_and_a_missing_install_with_the_fix(monkeypatch):
    with pytest.raises(LoptError, match="--liger needs a CUDA GPU"):
        loss_module.liger_linear_cross_entropy(torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as if not installed
    with pytest.raises(LoptError, match="pip install liger-kernel"):
        loss_module.liger_linear_cross_entropy(torch.device("cuda"))


def saved_peak(model, backward) -> int:
    meter = SavedTensorMeter(model.parameters())
    with meter.active():
        forward_backward(model, [tiny_batch(batch=4, seq=48, prompt=8)], backward=backward)
    assert meter.live_bytes == 0, "every saved tensor must be released after the step"
    return meter.peak_bytes


def test_local_backward_keeps_one_block_of_activations():
    """Deterministic saved-for-backward bytes: local ~ 1/k of joint, joint ~ e2e."""
    base = tiny_model("llama", layers=8)
    e2e = saved_peak(wrap(base, num_blocks=1), "local")
    joint2 = saved_peak(wrap(base, num_blocks=2), "joint")
    local2 = saved_peak(wrap(base, num_blocks=2), "local")
    local4 = saved_peak(wrap(base, num_blocks=4), "local")
    assert joint2 >= 0.95 * e2e  # the reference's single backward keeps everything
    assert local2 <= 0.6 * e2e
    assert local4 <= 0.35 * e2e
    assert local4 < local2


def test_parameter_groups_and_learning_rates():
    model = wrap(tiny_model("llama", layers=4), num_blocks=2)
    groups = model.parameter_groups()
    early_ids = {id(p) for p in groups["early"]}
    final_ids = {id(p) for p in groups["final"]}
    parts = model.parts
    assert id(parts.embeddings[0].weight) in early_ids
    assert all(id(p) in early_ids for p in model.aux_heads.parameters())
    assert all(id(p) in early_ids for i in model.blocks[0] for p in parts.layers[i].parameters())
    assert all(id(p) in final_ids for i in model.blocks[1] for p in parts.layers[i].parameters())
    assert id(parts.head.weight) in final_ids and id(parts.final_norm.weight) in final_ids
    assert len(early_ids) + len(final_ids) == len(list(model.parameters()))
    optimizer = build_optimizer(model, learning_rate=1e-4, lr_k1=3e-5, weight_decay=0.1)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["early"]["lr"] == 3e-5 and by_name["final"]["lr"] == 1e-4
    assert by_name["final_no_decay"]["weight_decay"] == 0.0 and by_name["final"]["weight_decay"] == 0.1
    e2e = wrap(tiny_model("llama"), num_blocks=1)
    assert e2e.parameter_groups()["early"] == []


def test_wrapping_unties_embeddings_and_e2e_keeps_them_tied():
    lopt = wrap(tiny_model("llama"), num_blocks=2)
    assert lopt.parts.head.weight is not lopt.parts.embeddings[0].weight
    assert lopt.config.tie_word_embeddings is False
    e2e = wrap(tiny_model("llama"), num_blocks=1)
    assert e2e.parts.head.weight is e2e.parts.embeddings[0].weight


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_folder_is_a_plain_checkpoint_with_the_same_logits(tmp_path, family):
    model = wrap(tiny_model(family), num_blocks=2)
    optimizer = build_optimizer(model, 1e-2, None, 0.0)
    forward_backward(model, [tiny_batch()], backward="local")
    optimizer.step()  # trained weights, so the check is not trivially the starting point
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.tie_word_embeddings is False
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = f.keys()
    assert not any("aux" in name for name in names)
    batch = tiny_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_generate_matches_the_base_model():
    base = tiny_model("llama")
    model = wrap(base, num_blocks=2).eval()
    prompt = tiny_batch(batch=1)["input_ids"][:, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), base.generate(prompt, **kwargs))


def test_non_finite_loss_stops_with_the_step_number():
    with pytest.raises(LoptError, match="step 7: task loss = nan"):
        check_finite(StepResult(task_loss=float("nan"), aux_losses=[0.1], tokens=1, input_tokens=1), 1.0, 7)
    with pytest.raises(LoptError, match=r"aux loss \(block 1\) = inf"):
        check_finite(StepResult(task_loss=1.0, aux_losses=[float("inf")], tokens=1, input_tokens=1), 1.0, 3)
    check_finite(StepResult(task_loss=1.0, aux_losses=[0.5], tokens=1, input_tokens=1), 2.0, 3)


def test_frozen_early_blocks_ablation_trains_only_the_final_block():
    base = tiny_model("llama", layers=4)
    model = LocalLearningLM(copy.deepcopy(base), num_blocks=2, early_blocks="frozen").train()
    assert len(model.aux_heads) == 0 and model.parameter_groups()["early"] == []
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    optimizer = build_optimizer(model, learning_rate=1e-2, lr_k1=None, weight_decay=0.0)
    result = forward_backward(model, [tiny_batch()], backward="local")
    optimizer.step()
    assert result.aux_losses == []
    changed = {n for n, p in model.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".layers.0." not in n and ".layers.1." not in n and "embed" not in n for n in changed)
    assert any(".layers.3." in n for n in changed) and "lm_head.weight" in changed
    with pytest.raises(LoptError, match="recon, frozen"):
        LocalLearningLM(copy.deepcopy(base), num_blocks=2, early_blocks="random")
