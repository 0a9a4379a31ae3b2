"""DPO on TRL with LoPT: a 2-step run, local == joint gradients, the synthetic pairs preset, data sources."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lopt.cli import main
from lopt.config import DPOConfig, parse_config
from lopt.data.generated import gsm_symbolic_pairs
from lopt.data.presets import preference_records
from lopt.errors import LoptError
from lopt.recipes.dpo import build_dpo_trainer
from lopt.recipes.registry import RECIPES
from lopt.training.metrics import contract_errors


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs(layers=6)


def dpo_flags(model_dir, out, *extra):
    return [
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--max_samples",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--max_seq_length",
        "2048",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        *extra,
    ]


def test_two_step_dpo_run_through_the_cli(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["dpo", *dpo_flags(model_dir, out, "--max_steps", "2", "--beta", "0.2", "--loss_type", "ipo")]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert {
        "task_loss",
        "aux_loss",
        "lr",
        "lr_k1",
        "grad_norm",
        "activation_peak_bytes",
        "reward_accuracy",
        "reward_margin",
    } <= set(metrics[0])
    assert len(metrics[0]["aux_loss"]) == 1 and metrics[0]["activation_peak_bytes"] > 0
    assert all(contract_errors(m, RECIPES["dpo"]) == [] for m in metrics)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 5e-4])  # the rate each step used (linear decay)
    args = json.loads((out / "training_args.json").read_text())
    assert (args["beta"], args["loss_type"], args["dataset_preset"]) == (0.2, "ipo", "gsm-symbolic-pairs")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("aux" in name for name in reloaded.state_dict())
    assert not torch.equal(reloaded.model.layers[-1].mlp.up_proj.weight, start.model.layers[-1].mlp.up_proj.weight)


def test_dpo_local_backward_equals_joint_with_less_saved_memory(model_dir, tmp_path):
    trainers = {}
    for mode in ("local", "joint"):
        config = parse_config(
            dpo_flags(model_dir, tmp_path / mode, "--backward", mode, "--gradient_accumulation_steps", "2"),
            DPOConfig,
            prog="lopt dpo",
        )
        trainers[mode] = build_dpo_trainer(config, tmp_path / mode)
    inputs = trainers["local"]._prepare_inputs(next(iter(trainers["local"].get_train_dataloader())))
    results = {}
    for mode, trainer in trainers.items():
        trainer.current_gradient_accumulation_steps = 2
        with trainer.saved_meter.active():
            loss = trainer.compute_loss(trainer.model, inputs)
            trainer.accelerator.backward(loss / 2)  # as Trainer.training_step scales a DPO loss
        params = list(trainer.model.parameters()) + list(trainer.lopt.aux_heads.parameters())
        results[mode] = ([p.grad for p in params], trainer.saved_meter.peak_bytes)
    (local_grads, local_peak), (joint_grads, joint_peak) = results["local"], results["joint"]
    assert all(g is not None for g in local_grads)
    for local, joint in zip(local_grads, joint_grads, strict=True):
        torch.testing.assert_close(local, joint, rtol=1e-5, atol=1e-7)
    assert local_peak < 0.75 * joint_peak, (local_peak, joint_peak)


def test_the_optim_flag_reaches_the_trainers_optimizer(model_dir, tmp_path):
    config = parse_config(dpo_flags(model_dir, tmp_path, "--optim", "adamw_8bit"), DPOConfig, prog="lopt dpo")
    trainer = build_dpo_trainer(config, tmp_path)
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__name__ == "AdamW8bit"  # lopt's groups (the heads included) with 8-bit state
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(trainer.lopt.parameters()))


def test_gsm_symbolic_pairs_differ_only_in_the_final_answer():
    pairs = gsm_symbolic_pairs(5, seed=3)
    assert len(pairs) == 5
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert pair["prompt"][0]["role"] == "user" and "####" in pair["prompt"][0]["content"]
        chosen_steps, chosen_answer = chosen.rsplit("\n", 1)
        rejected_steps, rejected_answer = rejected.rsplit("\n", 1)
        assert chosen_steps == rejected_steps and chosen_answer.startswith("#### ")
        assert rejected_answer.startswith("#### ") and float(rejected_answer[5:]) != float(chosen_answer[5:])
    assert gsm_symbolic_pairs(5, seed=3) == pairs  # reproducible


def test_preference_records_from_file_hub_and_bad_input(tmp_path, monkeypatch):
    import datasets

    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    assert preference_records(train_file=good) == [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    with pytest.raises(LoptError, match="missing \\['chosen', 'rejected'\\]"):
        preference_records(train_file=bad)
    with pytest.raises(LoptError, match="gsm-symbolic-pairs"):
        preference_records("gsm-symbolic-pair")

    chat_pair = {
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
    }
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([chat_pair])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert preference_records(dataset_name="someone/prefs", split="train_prefs") == [chat_pair]
    assert calls == [("someone/prefs", None, "train_prefs")]
