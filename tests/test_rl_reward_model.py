"""RL against a learned reward: `lopt grpo --reward_model`, `lopt rloo`, and `lopt eval --reward_model`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lopt.cli import main
from lopt.config import RLOOConfig, parse_config
from lopt.errors import LoptError
from lopt.evaluation.reward_model import heldout_pairs, pairwise_accuracy
from lopt.recipes.grpo import build_grpo_trainer, check_before_loading
from lopt.recipes.registry import RECIPES
from lopt.training.metrics import contract_errors
from resume_check import assert_resumed_to, stop_after_checkpoint


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs(layers=6)


@pytest.fixture(scope="module")
def reward_dir(model_dir, tmp_path_factory):
    """A reward model on the policy's tokenizer, as `lopt rm` saves one (its score head untrained, seeded)."""
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("reward") / "scorer"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rl_flags(model_dir, out, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_samples", "2",
        "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "8",
        "--max_prompt_length", "1024", "--logging_steps", "1", "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_lopt_rl_against_a_reward_model_steps_and_saves_a_plain_model(command, model_dir, reward_dir, tmp_path, capsys):
    out = tmp_path / command
    flags = rl_flags(model_dir, out, "--method", "lopt", "--max_steps", "2", "--reward_model", str(reward_dir))
    assert main([command, *flags, "--reward_weights", "0.5,1"]) == 0
    said = capsys.readouterr().err
    assert f"lopt {command}: lopt k=2" in said and "gsm_symbolic_score x0.5, scorer x1" in said
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(contract_errors(r, RECIPES[command]) == [] for r in rows)
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    # 2 steps x 2 completions (one prompt's group per step)
    assert len(completions) == 4 and all(set(c["rewards"]) == {"gsm_symbolic_score", "scorer"} for c in completions)
    for c in completions:  # the total is the weighted sum of the two scores
        assert c["reward"] == pytest.approx(0.5 * c["rewards"]["gsm_symbolic_score"] + c["rewards"]["scorer"])
    policy = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("aux" in name for name in load_file(out / "model.safetensors"))
    assert not torch.equal(policy.model.layers[-1].mlp.up_proj.weight, start.model.layers[-1].mlp.up_proj.weight)


def test_the_reward_models_score_is_what_it_gives_the_text(model_dir, reward_dir, tmp_path):
    """TRL scores prompt + completion through the reward model's chat template: completions.jsonl holds that score."""
    out = tmp_path / "run"
    assert main(["grpo", *rl_flags(model_dir, out, "--max_steps", "1", "--reward_model", str(reward_dir))]) == 0
    first = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    messages = [{"role": "user", "content": first["prompt"]}, {"role": "assistant", "content": first["completion"]}]
    ids = tokenizer(
        tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False, return_tensors="pt"
    )
    with torch.no_grad():
        score = model(**ids).logits[0, 0].item()
    assert first["rewards"]["scorer"] == pytest.approx(score, abs=1e-4)


def test_a_resumed_rloo_run_ends_on_the_uninterrupted_weights(model_dir, reward_dir, tmp_path):
    """2 prompts, one a step: resumed after the first epoch, the second takes its prompts in the uninterrupted run's
    order (TRL's own sampler would not: _EpochSeededSampler)."""
    out = tmp_path / "rloo"
    flags = rl_flags(model_dir, out, "--max_steps", "3", "--save_steps", "1", "--reward_model", str(reward_dir))
    assert main(["rloo", *flags]) == 0
    straight = stop_after_checkpoint(out)
    assert main(["rloo", *flags, "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    assert_resumed_to(out, straight)


def _config(model_dir, out, *extra) -> RLOOConfig:
    return parse_config(rl_flags(model_dir, out, *extra), RLOOConfig, prog="lopt rloo")


def test_what_is_not_a_reward_model_is_refused_before_the_policy_loads(model_dir, reward_dir, tmp_path):
    with pytest.raises(LoptError, match=r"--reward_model .* is LlamaForCausalLM \(llama\), not a reward model"):
        build_grpo_trainer(_config(model_dir, tmp_path / "a", "--reward_model", str(model_dir)), tmp_path / "a")
    for setting, message in (("num_labels", "a classifier with 2 labels"), ("pad_token_id", "has no pad_token_id")):
        broken = tmp_path / setting
        config = json.loads((reward_dir / "config.json").read_text())
        if setting == "num_labels":
            config["id2label"] = {"0": "A", "1": "B"}
            config["label2id"] = {"A": 0, "B": 1}
        else:
            config["pad_token_id"] = None
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps(config))
        with pytest.raises(LoptError, match=message):
            build_grpo_trainer(_config(model_dir, tmp_path / "b", "--reward_model", str(broken)), tmp_path / "b")
    with pytest.raises(LoptError, match=r"--reward_weights 1 gives 1 weight\(s\) for 2 reward function\(s\)"):
        # checked where the user's reward functions are imported: by the recipe, before anything loads
        check_before_loading(
            _config(model_dir, tmp_path / "c", "--reward_model", str(reward_dir), "--reward_weights", "1")
        )


def test_a_reward_model_with_another_tokenizer_is_said_to_re_tokenize(model_dir, reward_dir, tmp_path, capsys):
    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.add_tokens(["<extra_token>"])  # a different vocabulary
    AutoModelForSequenceClassification.from_pretrained(reward_dir).save_pretrained(other)
    tokenizer.save_pretrained(other)
    build_grpo_trainer(_config(model_dir, tmp_path / "run", "--reward_model", str(other)), tmp_path / "run")
    assert "the --reward_model tokenizer differs from the policy's" in capsys.readouterr().err


def test_eval_reward_model_counts_pairs_ranked_right(model_dir, reward_dir, tmp_path, capsys):
    pairs = heldout_pairs("gsm-symbolic-reasoning-pairs", 6, None)
    assert len(pairs) == 6 and all(p["chosen"] != p["rejected"] for p in pairs)
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    result = pairwise_accuracy(model, tokenizer, pairs, batch_size=4)
    by_hand = 0  # each answer scored alone, as TRL's RewardTrainer renders it
    for pair in pairs:
        scores = []
        for answer in (pair["chosen"], pair["rejected"]):
            text = tokenizer.apply_chat_template(pair["prompt"] + answer, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                scores.append(model(**ids).logits[0, 0].item())
        by_hand += scores[0] > scores[1]
    assert (result["n"], result["correct"]) == (6, by_hand)

    assert main(["eval", str(reward_dir), "--reward_model", "--eval_samples", "6"]) == 0
    written = json.loads((reward_dir / "eval.json").read_text())
    assert (written["pairs"], written["n"], written["correct"]) == ("gsm-symbolic-reasoning-pairs", 6, by_hand)
    assert "pairwise accuracy" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--reward_model"]) != 0  # a causal LM, named as the argument that gave it
    assert "MODEL_DIR " + str(model_dir) + " is LlamaForCausalLM (llama), not a reward model" in capsys.readouterr().err
