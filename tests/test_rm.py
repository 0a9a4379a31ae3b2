"""`lopt rm`: reward models on TRL's RewardTrainer, E2E or LoPT; the offline reasoning pairs; bad preference data."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lopt.cli import main
from lopt.config import RMConfig, parse_config
from lopt.data.generated import gsm_symbolic_reasoning_pairs
from lopt.data.presets import preference_records
from lopt.errors import LoptError
from lopt.recipes.registry import RECIPES
from lopt.recipes.rm import build_rm_trainer
from lopt.training.metrics import contract_errors
from resume_check import assert_resumed_to, stop_after_checkpoint


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs(layers=6)


def rm_flags(model_dir, out, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_samples", "8",
        "--per_device_train_batch_size", "2", "--max_seq_length", "2048", "--logging_steps", "1",
        "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


def _trainer(model_dir, out, *extra):
    return build_rm_trainer(parse_config(rm_flags(model_dir, out, *extra), RMConfig, prog="lopt rm"), out)


def _gradients(trainer, inputs) -> dict[str, torch.Tensor | None]:
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets for each window
    trainer.model.zero_grad(set_to_none=True)
    trainer.lopt.aux_heads.zero_grad(set_to_none=True)
    with trainer.saved_meter.active():
        loss = trainer.compute_loss(trainer.model, inputs)
        trainer.accelerator.backward(loss)
    return {name: p.grad for name, p in trainer.lopt.named_parameters()}


def test_lopt_reward_model_local_equals_joint_and_the_pairwise_loss_stays_in_the_final_block(model_dir, tmp_path):
    trainers = {mode: _trainer(model_dir, tmp_path / mode, "--backward", mode) for mode in ("local", "joint")}
    inputs = trainers["local"]._prepare_inputs(next(iter(trainers["local"].get_train_dataloader())))
    local, joint = (_gradients(trainers[mode], inputs) for mode in ("local", "joint"))
    assert local.keys() == joint.keys() and all(g is not None for g in local.values())
    for name in local:
        torch.testing.assert_close(local[name], joint[name], rtol=1e-5, atol=1e-7, msg=name)
    assert trainers["local"].saved_meter.peak_bytes < trainers["joint"].saved_meter.peak_bytes

    # the pairwise loss alone (no local losses): nothing reaches the first block, the embeddings or its head
    trainer = trainers["local"]
    trainer.lopt.lambda_aux = 0.0
    alone = _gradients(trainer, inputs)
    first = trainer.lopt.block_parameters()[0]
    first_names = {n for n, p in trainer.lopt.named_parameters() if any(p is q for q in first)}
    assert first_names and all(alone[n] is None or not alone[n].any() for n in first_names)
    assert alone["model.score.weight"].abs().sum() > 0  # the score head learns from it


def test_a_reward_model_run_saves_a_plain_reward_model_that_scores_as_trained(model_dir, tmp_path):
    out = tmp_path / "rm"
    assert main(["rm", *rm_flags(model_dir, out, "--method", "lopt", "--max_steps", "3")]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(contract_errors(r, RECIPES["rm"]) == [] for r in rows)
    assert {"reward_accuracy", "reward_margin", "reward_mean"} <= set(rows[0]) and len(rows[0]["aux_loss"]) == 1

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert not any("aux" in name for name in load_file(out / "model.safetensors"))
    # the trained weights, as the trainer held them at the end: the final checkpoint's
    trained = load_file(out / "checkpoint-3" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    batch = tokenizer(["2 + 2 = 4", "2 + 2 = 5, I think"], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits.squeeze(-1)
    start = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert not torch.equal(model.model.layers[-1].mlp.up_proj.weight, start.model.layers[-1].mlp.up_proj.weight)


def test_a_resumed_reward_model_run_ends_on_the_uninterrupted_weights(model_dir, tmp_path):
    out = tmp_path / "rm"
    # 8 pairs, 2 a step: 4 steps an epoch; resumed after the first epoch, the second must shuffle as it did
    flags = rm_flags(model_dir, out, "--method", "lopt", "--max_steps", "6", "--save_steps", "2")
    assert main(["rm", *flags]) == 0
    straight = stop_after_checkpoint(out)
    assert main(["rm", *flags, "--resume_from_checkpoint", str(out / "checkpoint-4")]) == 0
    assert_resumed_to(out, straight)


def test_reasoning_pairs_differ_in_a_step_or_in_the_answer():
    pairs = gsm_symbolic_reasoning_pairs(40, seed=5)
    kinds = []
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen != rejected
        chosen_steps, chosen_answer = chosen.rsplit("\n", 1)
        rejected_steps, rejected_answer = rejected.rsplit("\n", 1)
        if chosen_answer == rejected_answer:  # a wrong step: only the steps tell, and only by one number
            changed = [
                (a, b) for a, b in zip(chosen_steps.split("\n"), rejected_steps.split("\n"), strict=True) if a != b
            ]
            assert len(changed) == 1
            kinds.append("step")
        else:
            assert chosen_steps == rejected_steps and rejected_answer.startswith("#### ")
            kinds.append("answer")
    assert 10 <= kinds.count("step") <= 30, kinds  # about half each way
    assert gsm_symbolic_reasoning_pairs(40, seed=5) == pairs  # reproducible


def test_bad_preference_data_is_refused_before_the_model_loads(model_dir, tmp_path):
    same = tmp_path / "same.jsonl"
    same.write_text(
        json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
        + "\n"
        + json.dumps({"prompt": "3+3?", "chosen": "6", "rejected": "6"})
        + "\n"
    )
    with pytest.raises(LoptError, match=r"record 2 of --train_file .*same.jsonl has the same chosen and rejected"):
        preference_records(train_file=same)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "2+2?", "chosen": "4"}) + "\n")
    with pytest.raises(LoptError, match=r"missing \['rejected'\]"):
        _trainer(model_dir, tmp_path / "out", "--train_file", str(missing))
    with pytest.raises(LoptError, match="--use_peft with lopt rm"):
        _trainer(model_dir, tmp_path / "out2", "--use_peft")
    with pytest.raises(LoptError, match="every record as too long.*none is left to train on; raise --max_seq_length"):
        _trainer(model_dir, tmp_path / "out3", "--max_seq_length", "16")  # TRL leaves out longer pairs


def test_hub_presets_read_their_dataset(monkeypatch):
    import datasets

    calls = []
    pair = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list([pair])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert preference_records("hh-rlhf", split="test") == [pair]
    assert preference_records("ultrafeedback") == [pair]
    assert calls == [("Anthropic/hh-rlhf", "test"), ("trl-lib/ultrafeedback_binarized", "train")]
