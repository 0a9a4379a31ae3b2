"""GRPO on TRL with LoPT: a 2-step run, local == joint gradients, the memory saving, generation, CLI."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lopt.cli import main
from lopt.config import GRPOConfig, parse_config
from lopt.data.presets import grpo_records
from lopt.errors import LoptError
from lopt.recipes.grpo import build_grpo_trainer, check_before_loading, prepare_prompts, run_grpo
from lopt.recipes.registry import RECIPES
from lopt.recipes.trl.arguments import trl_arguments
from lopt.training.metrics import contract_errors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs(layers=6)


def grpo_flags(model_dir, out, *extra) -> list[str]:
    """A tiny `lopt grpo` run's flags: 2 prompts, 2 completions of at most 8 tokens each."""
    return [
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--max_samples",
        "2",
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--max_completion_length",
        "8",
        "--max_prompt_length",
        "1024",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        *extra,
    ]


def grpo_config(model_dir, out, *extra):
    return parse_config(grpo_flags(model_dir, out, *extra), GRPOConfig, prog="lopt grpo")


def test_two_step_grpo_run_writes_a_plain_model_metrics_and_completions(model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_grpo(
        grpo_config(
            model_dir, out, "--max_steps", "2", "--gradient_accumulation_steps", "2", "--format_reward_weight", "0.5"
        )
    )
    assert result.steps == 2 and len(result.metrics) == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    sft_schema = {
        "step",
        "epoch",
        "task_loss",
        "aux_loss",
        "lr",
        "lr_k1",
        "grad_norm",
        "tokens_per_s",
        "peak_mem_bytes",
        "activation_peak_bytes",
        "elapsed_s",
    }
    assert sft_schema | {"reward", "reward_std", "completion_length"} <= set(metrics[0])
    assert len(metrics[0]["aux_loss"]) == 1 and metrics[0]["aux_loss"][0] > 0
    assert metrics[0]["activation_peak_bytes"] > 0 and metrics[0]["grad_norm"] > 0
    assert all(contract_errors(m, RECIPES["grpo"]) == [] for m in metrics)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 5e-4])  # the rate each step used (linear decay)
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    # each step trains on a generation batch of 2 x 2 micro-batch rows: 2 prompts x 2 completions
    assert [c["step"] for c in completions] == [1] * 4 + [2] * 4
    assert set(completions[0]["rewards"]) == {"gsm_symbolic_score", "format_hash"}
    assert json.loads((out / "training_args.json").read_text())["task"] == "gsm-symbolic"
    # a plain HF checkpoint: reloads as is, no reconstruction head in it, and the weights were trained
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("aux" in name for name in reloaded.state_dict())
    assert not torch.equal(reloaded.model.layers[-1].mlp.up_proj.weight, start.model.layers[-1].mlp.up_proj.weight)


def loss_step(trainer, inputs):
    """One GRPO loss forward + backward as Trainer.training_step runs it, metered; returns (grads, peak)."""
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.saved_meter.reset_peak()
    with trainer.saved_meter.active():
        loss = trainer.compute_loss(trainer.model, inputs)
        trainer.accelerator.backward(loss)
    params = dict(trainer.model.named_parameters()) | {
        f"aux.{n}": p for n, p in trainer.lopt.aux_heads.named_parameters()
    }
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}, trainer.saved_meter.peak_bytes


def test_local_backward_equals_joint_and_frees_block_activations(model_dir, tmp_path):
    flags = (
        "--beta",
        "0.04",
        "--gradient_accumulation_steps",
        "2",
        "--loss_type",
        "grpo",
        "--max_completion_length",
        "16",
    )
    trainers = {
        mode: build_grpo_trainer(grpo_config(model_dir, tmp_path / mode, "--backward", mode, *flags), tmp_path / mode)
        for mode in ("local", "joint")
    }
    e2e = build_grpo_trainer(grpo_config(model_dir, tmp_path / "e2e", "--method", "e2e", *flags), tmp_path / "e2e")
    # one generated batch (with reference log-probs, beta > 0), trained on by all three
    generator = trainers["local"]
    inputs = generator._prepare_inputs(next(iter(generator.get_train_dataloader())))
    # randomize the advantages so that the task loss has a gradient whatever the rewards were
    inputs["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])[: inputs["advantages"].shape[0]]
    (local_grads, local_peak), (joint_grads, joint_peak) = (loss_step(trainers[m], inputs) for m in ("local", "joint"))
    _, e2e_peak = loss_step(e2e, inputs)

    assert local_grads.keys() == joint_grads.keys()
    assert any(n.startswith("aux.") for n in local_grads) and any("layers.0." in n for n in local_grads)
    for name in local_grads:
        torch.testing.assert_close(local_grads[name], joint_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert local_peak < 0.75 * joint_peak, (local_peak, joint_peak)
    assert local_peak < 0.75 * e2e_peak, (local_peak, e2e_peak)
    assert trainers["local"]._metrics["train"]["lopt/aux_loss_block_1"]


def test_generation_inside_trl_matches_the_base_model(model_dir, tmp_path):
    """Greedy, KV cache on: TRL's generation on the LoPT-wrapped model gives the base model's tokens."""
    config = grpo_config(model_dir, tmp_path / "gen", "--max_completion_length", "12")
    trainer = build_grpo_trainer(config, tmp_path / "gen", generation_kwargs={"do_sample": False, "use_cache": True})
    prompt_ids = [[5, 17, 42, 99, 7], [8, 3, 250, 61, 12, 33, 90]]
    completions, _ = trainer._generate_single_turn(prompt_ids, None, {}, num_generations=1)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for prompt, completion in zip(prompt_ids, completions, strict=True):
        expected = base.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            use_cache=True,
            pad_token_id=base.config.pad_token_id,
            eos_token_id=base.config.eos_token_id,
        )
        expected = expected[0, len(prompt) :].tolist()
        if base.config.eos_token_id in expected:  # TRL drops everything after the first EOS
            expected = expected[: expected.index(base.config.eos_token_id) + 1]
        assert completion == expected


def test_flags_trl_does_not_know_are_reported_once(model_dir, tmp_path, caplog):
    from trl import GRPOConfig as TRLGRPOConfig

    config = grpo_config(model_dir, tmp_path / "x")
    with caplog.at_level(logging.WARNING, logger="lopt.recipes.trl.arguments"):
        args = trl_arguments(TRLGRPOConfig, config, num_generations=2, not_a_trl_setting=3)
    reports = [r.getMessage() for r in caplog.records if "not_a_trl_setting" in r.getMessage()]
    assert len(reports) == 1 and "--not_a_trl_setting" in reports[0]
    assert not hasattr(args, "not_a_trl_setting") and args.num_generations == 2


def test_trl_rejections_become_lopt_errors(model_dir, tmp_path):
    from trl import GRPOConfig as TRLGRPOConfig

    # a generation batch of 3 cannot be split into micro-batches of 2 (a TRL setting lopt does not expose)
    with pytest.raises(LoptError, match="TRL rejected"):
        trl_arguments(TRLGRPOConfig, grpo_config(model_dir, tmp_path / "bad"), generation_batch_size=3)


def test_a_group_size_that_does_not_divide_the_generation_batch_names_lopt_flags(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LoptError) as error:
        check_before_loading(
            grpo_config(model_dir, tmp_path, "--num_generations", "3", "--per_device_train_batch_size", "4")
        )
    message = str(error.value)
    assert "generation_batch_size" not in message  # TRL's name, which the user never set
    assert "4 completions sampled at a time" in message and "--gradient_accumulation_steps 1 x 1 process)" in message
    assert (
        "Use --per_device_train_batch_size 3 or 6, --gradient_accumulation_steps 3, or --num_generations 2 or 4."
        in message
    )
    for fix in (
        ("--per_device_train_batch_size", "3"),
        ("--per_device_train_batch_size", "6"),
        ("--gradient_accumulation_steps", "3"),
        ("--num_generations", "2"),
        ("--num_generations", "4"),
    ):
        check_before_loading(
            grpo_config(model_dir, tmp_path, "--num_generations", "3", "--per_device_train_batch_size", "4", *fix)
        )
    # processes count (torchrun and accelerate set WORLD_SIZE), and --steps_per_generation replaces accumulation
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LoptError, match=r"--steps_per_generation 1 x 2 processes\); .* --steps_per_generation 3"):
        check_before_loading(grpo_config(model_dir, tmp_path, "--num_generations", "3", "--steps_per_generation", "1"))
    with pytest.raises(LoptError, match="--num_generations must be at least 2"):
        grpo_config(model_dir, tmp_path, "--num_generations", "1")


def test_prompts_longer_than_max_prompt_length_are_skipped_saying_how_to_keep_them(model_dir, caplog):
    from transformers import AutoTokenizer

    from lopt.recipes.grpo import _prompt_length

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = grpo_records("gsm-symbolic", max_samples=3, seed=0)
    lengths = sorted(_prompt_length(tokenizer, r["prompt"]) for r in records)
    assert len(prepare_prompts(records, tokenizer, lengths[-1])) == 3
    with caplog.at_level(logging.WARNING, logger="lopt.recipes.grpo"):
        assert len(prepare_prompts(records, tokenizer, lengths[1])) == 2
    keep_all = (
        f"Pass --max_prompt_length {lengths[-1]} to keep them all (lopt skips a long prompt rather than cut it: a cut "
        "question cannot be answered)."
    )
    assert caplog.messages == [
        f"--max_prompt_length {lengths[1]} skipped 1 of 3 prompts: they are longer than {lengths[1]} tokens (prompt "
        f"template included), the longest {lengths[-1]}. {keep_all}"
    ]
    with pytest.raises(LoptError) as error:
        prepare_prompts(records, tokenizer, 5)
    assert str(error.value) == (
        "all 3 prompts are longer than --max_prompt_length 5 tokens (prompt template included): the shortest has "
        f"{lengths[0]}, the longest {lengths[-1]}. {keep_all}"
    )


def test_train_grpo_py_says_which_limit_dropped_the_prompts(model_dir, tmp_path, capsys):
    argv = ["--model_name_or_path", str(model_dir), "--max_samples", "2", "--max_prompt_length", "5"]
    code = main(["grpo", *argv, "--num_generations", "2", "--output_dir", str(tmp_path / "run")], reference=True)
    assert code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("train_grpo.py: error: all 2 prompts are longer than --max_prompt_length 5 tokens")
    assert "Pass --max_prompt_length " in error


def test_custom_reward_funcs_are_scored_weighted_and_logged(model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--max_steps", "2", "--save_steps", "2", "--format_reward_weight", "0.25"]
    custom = ["--reward_funcs", "custom_rewards:completion_chars", "--reward_weights", "1,0.5"]
    run_grpo(grpo_config(model_dir, out, *argv, *custom))
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [c["step"] for c in completions] == [1, 1, 2, 2]  # 1 prompt x 2 completions a step
    for row in completions:
        assert set(row["rewards"]) == {"gsm_symbolic_score", "format_hash", "completion_chars"}
        assert row["rewards"]["completion_chars"] == len(row["completion"])
        # TRL's weights: the task's 1 and the custom function's 0.5 from --reward_weights, the format reward's 0.25
        scores = row["rewards"]
        expected = scores["gsm_symbolic_score"] + 0.25 * scores["format_hash"] + 0.5 * scores["completion_chars"]
        assert row["reward"] == pytest.approx(expected)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step1 = [row["reward"] for row in completions if row["step"] == 1]
    assert metrics[0]["reward"] == pytest.approx(sum(step1) / len(step1), rel=1e-5)
    # TRL's own metrics (trackers, trainer_state.json) carry each function's mean score under its name
    logs = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    chars = [row["rewards"]["completion_chars"] for row in completions if row["step"] == 2]
    assert logs[1]["rewards/completion_chars/mean"] == pytest.approx(sum(chars) / len(chars), rel=1e-5)


def test_grpo_records_from_hub_tasks_use_the_real_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        rows = {
            "openai/gsm8k": [{"question": "2 + 3?", "answer": "2 + 3 = 5\n#### 5"}],
            "AI-MO/NuminaMath-CoT": [
                {"problem": "Half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}."},
                {"problem": "No answer", "solution": "Proof omitted."},
            ],
        }[name]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    gsm = grpo_records("gsm8k")
    assert gsm[0]["answer"] == "5" and "####" in gsm[0]["prompt"][0]["content"]
    numina = grpo_records("numinamath")
    assert numina == [
        {"prompt": [{"role": "user", "content": numina[0]["prompt"][0]["content"]}], "answer": "\\frac{1}{2}"}
    ]
    assert "\\boxed{}" in numina[0]["prompt"][0]["content"]
    assert calls == [("openai/gsm8k", "main", "train"), ("AI-MO/NuminaMath-CoT", None, "train")]


def test_grpo_records_select_samples_random_from_the_task_hub_and_a_file(monkeypatch, tmp_path):
    import datasets

    rows = [{"question": f"{n} + 1?", "answer": f"#### {n + 1}"} for n in range(20)]
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, config=None, split=None: datasets.Dataset.from_list(rows)
    )
    first = [r["answer"] for r in grpo_records("gsm8k", max_samples=4)]
    assert first == ["1", "2", "3", "4"]
    picked = [r["answer"] for r in grpo_records("gsm8k", max_samples=4, select_samples="random", seed=7)]
    assert picked == [r["answer"] for r in grpo_records("gsm8k", max_samples=4, select_samples="random", seed=7)]
    assert picked != first and len(set(picked)) == 4
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = [r["answer"] for r in grpo_records("gsm8k", train_file=path, max_samples=4, select_samples="random")]
    assert from_file != first and len(set(from_file)) == 4
    with pytest.raises(LoptError, match="unknown --select_samples"):
        grpo_records("gsm-symbolic", max_samples=4, select_samples="shuffled")


def test_grpo_records_from_a_file_and_bad_columns(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    assert grpo_records("gsm8k", train_file=good)[0]["answer"] == "2"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(LoptError, match="question/answer"):
        grpo_records("gsm8k", train_file=bad)
    with pytest.raises(LoptError, match="unknown --task"):
        grpo_records("gsm9k")


def test_cli_help_and_reference_flags():
    result = subprocess.run([sys.executable, str(REPO / "train_grpo.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in (
        "--task",
        "--num_generations",
        "--max_prompt_length",
        "--max_completion_length",
        "--temperature",
        "--top_p",
        "--beta",
        "--loss_type",
        "--num_iterations",
        "--steps_per_generation",
        "--use_vllm",
        "--lr_k1",
        "--lambda_aux",
        "--backward",
        "--no-bf16",
        "--fp16",
        "--config",
    ):
        assert flag in result.stdout, flag


@pytest.mark.integration
def test_grpo_steps_on_the_embedded_model(tmp_path):
    """A few LoPT GRPO steps on SmolLM2-135M with gsm-symbolic (short completions, to stay fast)."""
    threads = torch.get_num_threads()
    # On a shared 2-core CPU, two OpenMP threads spinning against other processes make generation
    # ten times slower; one thread is what this test needs.
    torch.set_num_threads(1)
    try:
        code = main(
            [
                "grpo",
                "--model_name_or_path",
                "HuggingFaceTB/SmolLM2-135M-Instruct",
                "--task",
                "gsm-symbolic",
                "--method",
                "ll",
                "--num_blocks",
                "2",
                "--max_samples",
                "4",
                "--max_steps",
                "2",
                "--num_generations",
                "2",
                "--per_device_train_batch_size",
                "2",
                "--max_completion_length",
                "16",
                "--max_prompt_length",
                "256",
                "--logging_steps",
                "1",
                "--output_dir",
                str(tmp_path / "run"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(0.0 <= m["reward"] <= 1.0 and m["aux_loss"][0] > 0 for m in metrics)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").config.tie_word_embeddings is False
