"""KTO on TRL with LoPT, the recipe added through the registry: a 2-step run through the CLI that writes the metrics
contract, local == joint gradients, the flags' checks, and the tools (report, watch, dashboard panel, model card)
showing its runs without code of their own."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lopt import runs
from lopt.cli import main
from lopt.config import parse_config
from lopt.config.preference import KTOConfig
from lopt.dashboard import watch
from lopt.dashboard.panels import rl_panel
from lopt.errors import LoptError
from lopt.recipes.kto import build_kto_trainer
from lopt.recipes.registry import RECIPES
from lopt.training.metrics import contract_errors


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs(layers=6)


def kto_flags(model_dir, out, *extra):
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_samples", "4",
        "--per_device_train_batch_size", "8", "--max_seq_length", "2048", "--logging_steps", "1",
        "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def kto_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kto") / "run"
    assert main(["kto", *kto_flags(model_dir, out, "--max_steps", "2", "--beta", "0.2")]) == 0
    return out


def test_two_step_kto_run_through_the_cli_writes_the_contract(kto_run, model_dir, capsys):
    metrics = [json.loads(line) for line in (kto_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(contract_errors(m, RECIPES["kto"]) == [] for m in metrics)
    assert len(metrics[0]["aux_loss"]) == 1 and metrics[0]["activation_peak_bytes"] > 0
    assert all(isinstance(m["kl"], float) and isinstance(m["reward_margin"], float) for m in metrics)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 5e-4])  # the rate each step used (linear decay)
    args = json.loads((kto_run / "training_args.json").read_text())
    assert (args["recipe"], args["beta"], args["loss_type"], args["desirable_weight"]) == ("kto", 0.2, "kto", 1.0)
    reloaded = AutoModelForCausalLM.from_pretrained(kto_run)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("aux" in name for name in reloaded.state_dict())
    assert not torch.equal(reloaded.model.layers[-1].mlp.up_proj.weight, start.model.layers[-1].mlp.up_proj.weight)


def test_the_tools_show_a_kto_run_from_its_registry_record(kto_run, tmp_path):
    from lopt.tools.publish import model_card
    from lopt.tools.report import write_report

    assert runs.load_run(kto_run).recipe == "kto"
    write_report([kto_run], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| kto |" in text and "reward margin" in text  # the recipe and its headline metric
    assert (tmp_path / "report" / "training_kto.png").stat().st_size > 0
    card = model_card(kto_run, "me/x")
    assert "tags:\n- lopt\n- local-learning\n- kto" in card and "KTO (TRL's KTOTrainer)" in card
    assert "the gsm-symbolic-pairs preset" in card
    folder = watch.RunFolder(kto_run)
    state = folder.poll()
    assert state.recipe == "kto" and state.finished and state.metrics.step == 2
    assert rl_panel(state) is not None  # the preference-data panel: reward margin, chosen / rejected


def test_kto_local_backward_equals_joint(model_dir, tmp_path):
    trainers = {}
    for mode in ("local", "joint"):
        config = parse_config(kto_flags(model_dir, tmp_path / mode, "--backward", mode), KTOConfig, prog="lopt kto")
        trainers[mode] = build_kto_trainer(config, tmp_path / mode)
    inputs = trainers["local"]._prepare_inputs(next(iter(trainers["local"].get_train_dataloader())))
    grads = {}
    for mode, trainer in trainers.items():
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.compute_loss(trainer.model, inputs)
        trainer.accelerator.backward(loss)
        grads[mode] = [p.grad for p in [*trainer.model.parameters(), *trainer.lopt.aux_heads.parameters()]]
    assert all(g is not None for g in grads["local"])
    for local, joint in zip(grads["local"], grads["joint"], strict=True):
        torch.testing.assert_close(local, joint, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--desirable_weight", "0"), "--desirable_weight must be above 0"),
        (("--metric_for_best_model", "eval_reward_accuracy", "--eval_ratio", "0.5"), "--metric_for_best_model"),
    ],
)
def test_kto_flags_are_checked_before_anything_loads(model_dir, tmp_path, extra, message):
    with pytest.raises(LoptError, match=message):
        parse_config(kto_flags(model_dir, tmp_path, *extra), KTOConfig, prog="lopt kto")


def test_kto_help_lists_its_own_flags_in_the_optimization_section(capsys):
    with pytest.raises(SystemExit):
        main(["kto", "--help"])
    text = capsys.readouterr().out
    optimization = text[text.index("\noptimization:") : text.index("\nvalidation:")]
    assert "--desirable_weight" in optimization and "--undesirable_weight" in optimization
