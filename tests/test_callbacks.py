"""Listeners and the task-loss plug-in: what the SFT loop and the TRL bridge tell; objectives added from outside."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from lopt.config import DPOConfig, SFTConfig, parse_config
from lopt.recipes.dpo import build_dpo_trainer
from lopt.recipes.registry import RECIPES
from lopt.recipes.sft import run_sft
from lopt.training.callbacks import Callback
from lopt.training.step import forward_backward
from lopt.training.task_loss import CausalLMLoss
from test_distributed import _wrapped
from test_dpo import dpo_flags
from tiny_data import sft_args
from tiny_models import tiny_batch


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, run):
        self.events.append(("begin", run))

    def on_step_end(self, step, task_loss):
        self.events.append(("step", step))

    def on_log(self, metrics):
        self.events.append(("log", metrics))

    def on_save(self, checkpoint):
        self.events.append(("save", checkpoint.name))

    def on_train_end(self, step):
        self.events.append(("end", step))


def test_sft_tells_every_listener_each_event_in_order(model_dir, train_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    config = parse_config(sft_args(model_dir, train_file, out, "--max_steps", "3", "--save_steps", "2",
                                   "--logging_steps", "2"), SFTConfig)  # fmt: skip
    recorder = Recorder()
    run_sft(config, callbacks=[recorder])
    kinds = [(kind, value if kind in ("step", "save", "end") else None) for kind, value in recorder.events]
    assert kinds == [("begin", None), ("step", 1), ("step", 2), ("log", None), ("save", "checkpoint-2"),
                     ("step", 3), ("log", None), ("end", 3)]  # fmt: skip
    run = recorder.events[0][1]
    assert (run.recipe, run.method, run.total_steps, run.start_step, run.output_dir) == ("sft", "lopt", 3, 0, out)
    assert [len(block) for block in run.blocks] == [2, 2] and run.backend == "replicated"
    # the listeners receive exactly the records metrics.jsonl holds
    logged = [value.to_json() for kind, value in recorder.events if kind == "log"]
    assert logged == [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trl_events_reach_lopt_listeners_through_the_bridge(model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "dpo"
    out.mkdir()
    config = parse_config(dpo_flags(model_dir, out, "--max_steps", "2"), DPOConfig, prog="lopt dpo")
    recorder = Recorder()
    build_dpo_trainer(config, out, callbacks=[recorder]).train()
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["begin", "step", "log", "step", "log", "save", "end"]  # the Trainer saves its last step
    assert recorder.events[5][1] == "checkpoint-2" and (out / "checkpoint-2" / "training_state.pt").is_file()
    run = recorder.events[0][1]
    assert (run.recipe, run.method, run.total_steps) == ("dpo", "lopt", 2)
    logs = [value for kind, value in recorder.events if kind == "log"]
    assert [m.step for m in logs] == [1, 2] and set(logs[0].recipe) == set(RECIPES["dpo"].columns) | set(
        RECIPES["dpo"].eval_columns
    )
    assert all(m.eval_task_loss is None and m.recipe["eval_reward_accuracy"] is None for m in logs)  # no validation


class Scaled:
    """A task loss `factor` times causal LM: the smallest objective that is not the default."""

    def __init__(self, factor: float):
        self.factor, self.base = factor, CausalLMLoss()

    def units(self, batch):
        return self.base.units(batch)

    def __call__(self, model, hidden, batch):
        return self.factor * self.base(model, hidden, batch)


def test_the_task_loss_drives_the_final_block_and_leaves_the_local_losses_alone():
    grads = {}
    for factor in (1.0, 3.0):
        model = _wrapped(2)
        result = forward_backward(model, [tiny_batch()], task_loss=Scaled(factor))
        grads[factor] = ({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, result)
    (plain, plain_result), (scaled, scaled_result) = grads[1.0], grads[3.0]
    final_ids = {id(p) for p in model.parameter_groups()["final"]}
    final = {n for n, p in model.named_parameters() if id(p) in final_ids}
    assert final and scaled_result.task_loss == 3.0 * plain_result.task_loss
    assert scaled_result.aux_losses == plain_result.aux_losses
    for name in plain:
        expected = 3.0 * plain[name] if name in final else plain[name]
        torch.testing.assert_close(scaled[name], expected, msg=lambda m, n=name: f"{n}: {m}")


class KLRegularized:
    """Causal LM + beta * KL(policy || reference) per trained token (InstructGPT-style), as a user would plug it in."""

    def __init__(self, reference, beta: float):
        self.reference, self.beta, self.base = reference, beta, CausalLMLoss()

    def units(self, batch):
        return self.base.units(batch)

    def __call__(self, model, hidden, batch):
        keep = batch["labels"][:, 1:] != -100
        log_p = F.log_softmax(model.parts.head(hidden[:, :-1][keep]).float(), dim=-1)
        with torch.no_grad():
            ref = self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_q = F.log_softmax(ref[:, :-1][keep].float(), dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")  # sum over tokens of KL(p || q)
        return self.base(model, hidden, batch) + self.beta * kl


def test_a_kl_term_plugs_into_run_sft_without_touching_the_loop(model_dir, train_file, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    def losses(name, task_loss):
        flags = sft_args(model_dir, train_file, tmp_path / name, "--max_steps", "2", "--logging_steps", "1")
        run_sft(parse_config(flags, SFTConfig), task_loss=task_loss)
        return [json.loads(line)["task_loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    plain, regularized = losses("plain", None), losses("kl", KLRegularized(reference, beta=5.0))
    # Step 1 starts at the reference: KL and its gradient are zero, so both runs take the same step;
    # step 2's policy has moved, and the KL term adds to the same cross entropy.
    assert regularized[0] == plain[0]
    assert regularized[1] > plain[1]
