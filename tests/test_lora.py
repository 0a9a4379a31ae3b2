"""LoRA adapters (peft) with E2E and LoPT: training, gradients across block boundaries, memory, saving,
merging, resume, and the flags' errors; on tiny models built in the test."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lopt.cli import main
from lopt.config import SFTConfig, parse_config
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.models.lora import add_lora, is_adapter_folder
from lopt.models.registry import load_model_and_tokenizer
from lopt.parallel.deepspeed import DeepSpeedBackend, ZeroSettings
from lopt.parallel.fsdp import FSDPBackend, FSDPSettings
from lopt.parallel.replicated import ReplicatedBackend
from lopt.recipes.grpo import run_grpo
from lopt.recipes.sft import run_sft
from lopt.runs import load_run, saved_parameters
from lopt.tools.report import table_rows
from lopt.training.memory import SavedTensorMeter
from lopt.training.step import forward_backward
from lopt.training.task_loss import CausalLMLoss
from test_dpo import dpo_flags
from test_grpo import grpo_config
from tiny_data import sft_args
from tiny_models import tiny_batch, tiny_model

LORA = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")


def lora_wrapped(num_blocks: int, layers: int = 4, seed: int = 0) -> LocalLearningLM:
    torch.manual_seed(seed)  # adapters and heads
    model = add_lora(tiny_model("llama", layers), LORA)
    for name, param in model.named_parameters():  # peft starts B at zero; a nonzero B gives every adapter a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return LocalLearningLM(model, num_blocks=num_blocks).train()


def adapter_grads(model: LocalLearningLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_freezes_the_base_and_lopt_does_not_untie_frozen_embeddings():
    model = lora_wrapped(num_blocks=2)
    parts = model.parts
    assert parts.head.weight is parts.embeddings[0].weight  # tied and frozen: no second copy made
    assert not parts.head.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("aux_heads.") for n in trainable)
    assert any(n.startswith("aux_heads.") for n in trainable)  # the reconstruction heads stay full-rank and trained
    early = [n for n in model.parameter_groups()["early"]]
    assert len(early) > len(list(model.aux_heads.parameters()))  # block 1's adapters are in the early group


def test_local_and_joint_backward_give_the_same_adapter_gradients():
    batch = tiny_batch(batch=2, seq=16)
    results = {}
    for mode in ("local", "joint"):
        model = lora_wrapped(num_blocks=2)
        forward_backward(model, [batch], backward=mode)
        results[mode] = adapter_grads(model)
    assert results["local"].keys() == results["joint"].keys() and results["local"]
    for name, grad in results["joint"].items():
        torch.testing.assert_close(results["local"][name], grad, atol=1e-6, rtol=1e-5)


def test_the_task_loss_gives_no_gradient_to_early_block_adapters():
    model = lora_wrapped(num_blocks=2)
    batch = tiny_batch(batch=2, seq=16)
    with model.boundary_step(None, 1.0, batch["attention_mask"]):
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    CausalLMLoss()(model, hidden, batch).backward()  # the task loss alone, no local loss
    early_layers = [f"layers.{i}." for i in model.blocks[0]]
    final_layers = [f"layers.{i}." for i in model.blocks[1]]
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(p.grad is None for n, p in lora.items() if any(layer in n for layer in early_layers))
    final = [p.grad for n, p in lora.items() if any(layer in n for layer in final_layers)]
    assert final and all(g is not None and g.abs().sum() > 0 for g in final)


def test_local_backward_keeps_its_memory_saving_with_adapters():
    batch = tiny_batch(batch=4, seq=48, prompt=8)
    peaks = {}
    for k in (1, 2, 4):
        model = lora_wrapped(num_blocks=k, layers=8)
        meter = SavedTensorMeter(model.parameters())
        with meter.active():
            forward_backward(model, [batch], backward="local")
        peaks[k] = meter.peak_bytes
    assert peaks[2] <= 0.6 * peaks[1] and peaks[4] <= 0.4 * peaks[1]


def test_lora_dropout_is_why_lora_saves_more_activations_than_full_fine_tuning():
    """peft drops out each adapted layer's input on its own and keeps that copy (and its mask) for backward, where
    full fine-tuning keeps one input per layer input, shared by q/k/v and gate/up. The README's demo table shows
    LoRA's higher activation peak; this is its cause, in bytes."""
    ids = tiny_batch(batch=4, seq=48, prompt=8)["input_ids"]

    def peak(model) -> int:
        meter = SavedTensorMeter(model.parameters())
        with meter.active():
            loss = model.train()(input_ids=ids, labels=ids).loss
        loss.backward()
        return meter.peak_bytes

    full = peak(tiny_model("llama", 4))
    with_dropout = peak(add_lora(tiny_model("llama", 4), SimpleNamespace(**{**vars(LORA), "lora_dropout": 0.05})))
    without = peak(add_lora(tiny_model("llama", 4), LORA))
    assert with_dropout > 1.3 * full and without < full


@pytest.mark.parametrize("method", [("--method", "e2e"), ("--num_blocks", "2")], ids=["e2e", "lopt"])
def test_a_lora_run_saves_an_adapter_that_peft_reloads_and_merges_to_the_same_logits(
    method, model_dir, train_file, tmp_path
):
    out = tmp_path / "adapter"
    flags = ("--use_peft", "--lora_r", "4", "--max_steps", "2", "--logging_steps", "1", *method)
    assert main(["sft", *sft_args(model_dir, train_file, out, *flags)]) == 0
    assert is_adapter_folder(out) and not (out / "model.safetensors").exists()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())  # trained
    assert saved_parameters(out) == sum(t.numel() for t in adapter.values())

    batch = tiny_batch(batch=2, seq=12)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with_adapter = logits(PeftModel.from_pretrained(base, out).eval(), batch)
    assert not torch.allclose(with_adapter, logits(AutoModelForCausalLM.from_pretrained(model_dir), batch))
    merged_by_lopt, _ = load_model_and_tokenizer(str(out))  # what lopt eval / generate load
    torch.testing.assert_close(logits(merged_by_lopt, batch), with_adapter, atol=1e-5, rtol=1e-4)

    merged_dir = tmp_path / "merged-at-the-end"  # the same run with --merge_lora writes a plain checkpoint
    assert main(["sft", *sft_args(model_dir, train_file, merged_dir, *flags, "--merge_lora")]) == 0
    assert not is_adapter_folder(merged_dir)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(logits(plain, batch), with_adapter, atol=1e-5, rtol=1e-4)

    command = tmp_path / "merged-by-command"
    assert main(["merge", str(out), "--out", str(command)]) == 0
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(command), batch), with_adapter, atol=1e-5, rtol=1e-4
    )

    rows = {row[0]: row for row in table_rows([load_run(out), load_run(merged_dir)])}
    assert rows["adapter"][1].endswith("+lora") and rows["adapter"][4] == f"{saved_parameters(out):,}"


def test_resuming_a_lora_run_ends_on_the_uninterrupted_adapter(model_dir, train_file, tmp_path):
    out = tmp_path / "run"
    flags = ("--use_peft", "--num_blocks", "2", "--max_steps", "4", "--save_steps", "2")
    assert main(["sft", *sft_args(model_dir, train_file, out, *flags)]) == 0
    straight = load_file(str(out / "adapter_model.safetensors"))
    assert is_adapter_folder(out / "checkpoint-2")
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # as if stopped after checkpoint-2
        (out / name).unlink()
    assert main(["sft", *sft_args(model_dir, train_file, out, *flags, "--resume_from_checkpoint", "latest")]) == 0
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0)


def test_qlora_flags_on_cpu_say_what_to_use_instead(model_dir, train_file, tmp_path):
    config = parse_config(sft_args(model_dir, train_file, tmp_path / "q", "--use_peft", "--load_in_4bit"), SFTConfig)
    with pytest.raises(LoptError, match=r"--load_in_4bit \(QLoRA\).*CUDA GPU.*--use_peft"):
        run_sft(config)
    assert not (tmp_path / "q" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--lora_r", "8"), "--lora_r configure LoRA adapters; add --use_peft"),
        (("--merge_lora",), "--merge_lora configure LoRA adapters"),
        (("--use_peft", "--lora_r", "0"), "--lora_r must be at least 1"),
        (("--use_peft", "--lora_dropout", "1.5"), r"--lora_dropout must be in \[0, 1\)"),
        (("--use_peft", "--lora_target_modules", "q_proj,lm_head"), "lm_head cannot carry an adapter"),
        (("--use_peft", "--load_in_4bit", "--load_in_8bit"), "exclusive"),
    ],
)
def test_bad_adapter_flags_are_refused_before_anything_loads(flags, message, tmp_path):
    with pytest.raises(LoptError, match=message):
        parse_config(["--output_dir", str(tmp_path), *flags], SFTConfig)


def test_an_unknown_target_module_names_the_model_layers(model_dir, train_file, tmp_path):
    config = parse_config(
        sft_args(model_dir, train_file, tmp_path / "r", "--use_peft", "--lora_target_modules", "qkv"), SFTConfig
    )
    with pytest.raises(LoptError, match="--lora_target_modules qkv: .*q_proj,k_proj"):
        run_sft(config)


def test_adapters_and_kl_under_sharding_are_refused_by_name(tmp_path):
    device = torch.device("cpu")
    config = parse_config(["--output_dir", str(tmp_path), "--use_peft"], SFTConfig)
    ReplicatedBackend(device, config)  # data parallel: fine
    with pytest.raises(LoptError, match="--use_peft under FSDP2: .*torchrun"):
        FSDPBackend(device, config, FSDPSettings())
    config = parse_config(["--output_dir", str(tmp_path), "--kl_beta", "0.1"], SFTConfig)
    with pytest.raises(LoptError, match="--kl_beta under DeepSpeed ZeRO-3: .*unsharded copy"):
        DeepSpeedBackend(device, ZeroSettings(stage=3), config)


def test_merge_refuses_what_is_not_an_adapter(model_dir, tmp_path, capsys):
    assert main(["merge", str(model_dir), "--out", str(tmp_path / "m")]) == 2
    assert "holds a full model (config.json), nothing to merge" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    shutil.copy(model_dir / "tokenizer.json", adapter)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "m2")]) == 2
    assert "names no base_model_name_or_path" in capsys.readouterr().err


def test_dpo_and_grpo_with_lopt_train_and_save_only_the_policy_adapter(tiny_model_dirs, tmp_path_factory):
    model_dir = tiny_model_dirs(layers=6)
    dpo_out, grpo_out = tmp_path_factory.mktemp("dpo") / "run", tmp_path_factory.mktemp("grpo") / "run"
    peft_flags = ("--use_peft", "--lora_r", "4", "--num_blocks", "2", "--max_steps", "2")
    assert main(["dpo", *dpo_flags(model_dir, dpo_out, *peft_flags)]) == 0
    run_grpo(grpo_config(model_dir, grpo_out, *peft_flags))
    for out in (dpo_out, grpo_out):
        assert is_adapter_folder(out) and not (out / "model.safetensors").exists()
        adapter = load_file(str(out / "adapter_model.safetensors"))
        # one adapter, the policy's (TRL may add a reference adapter while training; it is not saved)
        assert adapter and all("lora_" in name and ".ref." not in name for name in adapter)
        assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 2 and len(metrics[-1]["aux_loss"]) == 1
        reloaded, _ = load_model_and_tokenizer(str(out))
        assert sum(p.numel() for p in reloaded.parameters()) == sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()
        )  # merged into a plain model of the base's size
