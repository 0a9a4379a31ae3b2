"""Validation while training (--eval_file / --eval_split / --eval_ratio): the losses against a hand computation, in
one and two processes (replicated and FSDP2), the held-out split, metrics.jsonl rows, the best model, early stopping,
the flags' errors, and DPO / GRPO through TRL's evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopt.cli import main
from lopt.config import DPOConfig, GRPOConfig, SFTConfig, eval_steps, parse_config
from lopt.dashboard.panels import training_panel
from lopt.dashboard.state import DashboardState
from lopt.dashboard.watch import step_metrics
from lopt.data.collate import IGNORE_INDEX, collate, tokenize_sft
from lopt.data.order import eval_batches
from lopt.data.presets import hold_out, sft_records, with_validation
from lopt.errors import LoptError
from lopt.parallel.fsdp import FSDPSettings, reshard, shard_model
from lopt.recipes.grpo import check_before_loading
from lopt.recipes.registry import RECIPES
from lopt.training import validation
from lopt.training.checkpoint import prune_checkpoints
from lopt.training.metrics import StepMetrics, contract_errors
from lopt.training.step import EvalResult, evaluate
from lopt.training.trackers import tracker_scalars
from test_distributed import WORLD, _wrapped, spawn
from test_dpo import dpo_flags
from test_fsdp import ACCELERATE_FSDP2, _sft
from test_grpo import grpo_config
from tiny_data import SFT_RECORDS, sft_args
from tiny_models import tiny_batch

EVAL_RECORDS = [{"instruction": f"What is {a} times 2?", "input": "", "output": f"It is {2 * a}."} for a in range(5)]


def run_cli(command: str, args: list[str], capsys) -> tuple[int, str]:
    code = main([command, *args])
    return code, capsys.readouterr().err


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def eval_file(tmp_path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in EVAL_RECORDS))
    return path


# ---- the losses ------------------------------------------------------------------------------------


def _by_hand(model, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Cross entropy per trained token and block 1's reconstruction loss per real token, from the plain model's
    forward (logits and hidden states) and the head, summed over every batch."""
    ce, units, recon, tokens = 0.0, 0, 0.0, 0
    block = model.blocks[0]
    with torch.no_grad():
        for batch in batches:
            out = model.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            )
            labels = batch["labels"][:, 1:]
            keep = labels != IGNORE_INDEX
            ce += float(F.cross_entropy(out.logits[:, :-1][keep], labels[keep], reduction="sum"))
            units += int(keep.sum())
            error = (model.aux_heads[0](out.hidden_states[block.stop]) - out.hidden_states[block.start]).pow(2)
            real = batch["attention_mask"].bool()
            recon += float(error.mean(dim=-1)[real].sum())
            tokens += int(real.sum())
    return ce / units, recon / tokens


def test_evaluate_is_the_mean_over_every_validation_token_by_hand():
    model = _wrapped(2)  # LoPT, k=2 on 4 layers, in training mode
    for head in model.aux_heads:  # a head that predicts something, so the local loss is not near its start
        torch.nn.init.normal_(head.net[-1].weight, std=0.5)
    # batches of different sizes and padding: a mean of batch means would differ from the mean per token
    batches = [tiny_batch(batch=3, seq=12, seed=3), tiny_batch(batch=2, seq=7, prompt=2, seed=4)]
    uncounted = tiny_batch(batch=2, seed=9)
    result = evaluate(model, [(batches[0], True), (uncounted, False), (batches[1], True)])
    assert model.training  # back in the mode it was in
    task, recon = _by_hand(model.eval(), batches)
    assert result.task_loss == pytest.approx(task, rel=1e-5)
    assert result.aux_losses == pytest.approx([recon], rel=1e-5)
    assert evaluate(model, [(b, True) for b in batches]).task_loss == pytest.approx(task, rel=1e-5)
    with_uncounted = evaluate(model, [(b, True) for b in [*batches, uncounted]]).task_loss
    assert with_uncounted != pytest.approx(task, rel=1e-5)  # the uncounted batch above was left out


def _examples(n: int) -> list[dict]:
    batch = tiny_batch(batch=n, seq=10, seed=11)
    lengths = [10 - i % 4 for i in range(n)]  # unequal lengths: collate pads each batch
    return [
        {"input_ids": batch["input_ids"][i, :length].tolist(), "labels": batch["labels"][i, :length].tolist()}
        for i, length in enumerate(lengths)
    ]


def _validate_in_processes(rank: int, out_dir: str, fsdp: bool):
    model = _wrapped(2)
    if fsdp:
        shard_model(model, FSDPSettings(), torch.device("cpu"))
    examples = _examples(5)  # 3 + 2: the second process repeats one example in a batch that does not count
    batches = [(collate([examples[i] for i in idx], 0), counted) for idx, counted in eval_batches(5, 2, WORLD, rank)]
    result = evaluate(model, batches)
    if fsdp:  # the final norm and LM head stay gathered after a forward without backward, until resharded
        reshard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
    torch.save([result.task_loss, *result.aux_losses], Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp2"])
def test_two_processes_validate_like_one(tmp_path, fsdp):
    spawn(_validate_in_processes, str(tmp_path / "init"), str(tmp_path), fsdp, timeout_s=120)
    examples = _examples(5)
    expected = evaluate(_wrapped(2), [(collate([e], 0), True) for e in examples])
    for rank in range(WORLD):  # every process holds the whole sum
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == pytest.approx([expected.task_loss, *expected.aux_losses], rel=1e-5)


def test_an_fsdp2_launch_validates_like_one_process_and_checkpoints_after_it(model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i}"}) + "\n" for i in range(14)))
    # 4 validation records, one per batch: 2 batches on each process; a checkpoint right after each validation
    flags = ["--eval_ratio", "0.25", "--eval_steps", "1", "--per_device_eval_batch_size", "1", "--max_steps", "2"]
    _sft(ACCELERATE_FSDP2, model_dir, data, tmp_path / "fsdp", *flags)
    one = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-3", *flags]
    assert main(["sft", "--model_name_or_path", str(model_dir), "--train_file", str(data), "--output_dir",
                 str(tmp_path / "one"), *one]) == 0  # fmt: skip
    sharded, single = rows(tmp_path / "fsdp"), rows(tmp_path / "one")
    assert [r["step"] for r in sharded] == [1, 2] and (tmp_path / "fsdp" / "checkpoint-1").is_dir()
    for got, expected in zip(sharded, single, strict=True):
        assert got["eval_task_loss"] == pytest.approx(expected["eval_task_loss"], rel=1e-4)
        assert got["eval_aux_loss"] == pytest.approx(expected["eval_aux_loss"], rel=1e-3)


def test_eval_batches_cover_each_example_once_and_keep_processes_in_step():
    for n, size, world in [(5, 2, 2), (1, 4, 2), (9, 3, 4), (7, 3, 1)]:
        per_process = [eval_batches(n, size, world, rank) for rank in range(world)]
        counted = sorted(i for batches in per_process for idx, on in batches if on for i in idx)
        assert counted == list(range(n))
        assert len({len(batches) for batches in per_process}) == 1  # as many forwards on every process


# ---- the held-out split -------------------------------------------------------------------------------


def test_eval_ratio_holds_out_a_disjoint_seeded_fraction():
    records = [{"id": i} for i in range(20)]
    train, held = hold_out(records, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(r["id"] for r in train + held) == list(range(20))  # disjoint, nothing lost
    assert [r["id"] for r in train] == sorted(r["id"] for r in train)  # the training records keep their order
    assert hold_out(records, 0.25, seed=3) == (train, held)  # deterministic
    assert hold_out(records, 0.25, seed=4)[1] != held  # drawn with --seed
    assert len(hold_out(records, 0.01, seed=3)[1]) == 1  # rounded up, as datasets' train_test_split
    with pytest.raises(LoptError, match=r"--eval_ratio 0.99 holds out 20 of the 20 training records"):
        hold_out(records, 0.99, seed=3)


def test_eval_ratio_splits_the_training_file_after_max_samples(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SFT_RECORDS))
    config = parse_config(
        ["--train_file", str(path), "--output_dir", "o", "--eval_ratio", "0.25", "--max_samples", "8"]
    )
    train, held = with_validation(config, lambda **o: sft_records(config, **o), generated=False)
    assert len(train) == 6 and len(held) == 2 and not [r for r in held if r in train]
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, SFT_RECORDS[:8]))


def test_eval_file_is_read_whole_and_named_in_its_errors(tmp_path, eval_file):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SFT_RECORDS))
    config = parse_config(["--train_file", str(path), "--output_dir", "o", "--eval_file", str(eval_file)])
    config.max_samples = 2  # picks training records only
    train, held = with_validation(config, lambda **o: sft_records(config, **o), generated=False)
    assert train == SFT_RECORDS[:2] and held == EVAL_RECORDS
    config.eval_file = str(tmp_path / "missing.jsonl")
    with pytest.raises(LoptError, match=r"^--eval_file .*missing\.jsonl: no such file"):
        with_validation(config, lambda **o: sft_records(config, **o), generated=False)


# ---- lopt sft ----------------------------------------------------------------------------------------------


def test_validation_rows_pass_the_contract_and_hold_the_final_models_loss(
    model_dir, train_file, eval_file, tmp_path, capsys
):
    out = tmp_path / "run"
    flags = ("--max_steps", "5", "--logging_steps", "10")
    code, err = run_cli("sft", sft_args(model_dir, train_file, out, *flags), capsys)
    assert code == 0, err
    validation = ("--eval_file", str(eval_file), "--eval_steps", "2", "--per_device_eval_batch_size", "2")
    code, err = run_cli("sft", sft_args(model_dir, train_file, tmp_path / "steps", *flags, *validation), capsys)
    assert code == 0, err
    assert "validating on 5 examples every 2 steps" in " ".join(err.split())
    logged = rows(tmp_path / "steps")
    assert [r["step"] for r in logged] == [2, 4, 5]  # each validation logs its step, and the last step validates
    assert all(contract_errors(r, RECIPES["sft"]) == [] for r in logged)
    assert all(isinstance(r["eval_task_loss"], float) and len(r["eval_aux_loss"]) == 1 for r in logged)
    # the last validation is the saved model's loss on the validation records
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "steps")
    examples, _ = tokenize_sft(EVAL_RECORDS, tokenizer, 64, "chat")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "steps").eval()
    ce, units = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"][1:])
            keep = labels != IGNORE_INDEX
            ce += float(F.cross_entropy(final(ids).logits[0, :-1][keep], labels[keep], reduction="sum"))
            units += int(keep.sum())
    assert logged[-1]["eval_task_loss"] == pytest.approx(ce / units, rel=1e-5)
    # lopt report draws the validations beside the training loss
    assert main(["report", str(tmp_path / "steps"), "--out", str(tmp_path / "report")]) == 0
    assert "(dashed: validation)" in (tmp_path / "report" / "report.md").read_text()
    # validating changes nothing in training: the same model as the run without validation
    for name, value in load_file(out / "model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "steps" / "model.safetensors")[name]), name


def test_load_best_model_at_end_saves_the_best_checkpoints_weights(model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "best"
    # a learning rate that first helps, then diverges: the last weights are not the best
    flags = ["--learning_rate", "0.2", "--lr_scheduler_type", "constant", "--max_steps", "6", "--eval_ratio", "0.25"]
    flags += ["--eval_steps", "1", "--save_steps", "1", "--save_total_limit", "1", "--load_best_model_at_end"]
    code, err = run_cli("sft", sft_args(model_dir, train_file, out, *flags), capsys)
    assert code == 0, err
    losses = {r["step"]: r["eval_task_loss"] for r in rows(out)}
    best = min(losses, key=losses.get)
    assert best < 5, losses  # the premise: a later checkpoint (step 5) is not the best
    # --save_total_limit 1 keeps the newest checkpoint, and the best one for --load_best_model_at_end
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best}", "checkpoint-5"})
    saved, best_weights = (
        load_file(out / "model.safetensors"),
        load_file(out / f"checkpoint-{best}" / "model.safetensors"),
    )
    assert saved.keys() == best_weights.keys() and all(torch.equal(saved[k], best_weights[k]) for k in saved)
    newest = load_file(out / "checkpoint-5" / "model.safetensors")
    assert not all(torch.equal(saved[k], newest[k]) for k in saved)
    assert f"best validation: step {best}, eval_task_loss {losses[best]:.4f}" in " ".join(err.split())
    assert AutoModelForCausalLM.from_pretrained(out) is not None  # a complete model folder
    # resumed elsewhere from the newest checkpoint, the run still knows its best (in training_state.pt)
    resumed = tmp_path / "resumed"
    code, err = run_cli(
        "sft",
        sft_args(model_dir, train_file, resumed, *flags, "--resume_from_checkpoint", str(out / "checkpoint-5")),
        capsys,
    )
    assert code == 0, err
    assert [r["step"] for r in rows(resumed)] == [6]
    again = load_file(resumed / "model.safetensors")
    assert all(torch.equal(again[k], best_weights[k]) for k in saved)


def test_prune_checkpoints_never_deletes_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "training_state.pt").write_bytes(b"")
    prune_checkpoints(tmp_path, 1, tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    prune_checkpoints(tmp_path, 1)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-4"]


def test_early_stopping_stops_after_patience_validations_without_improvement(
    model_dir, train_file, tmp_path, capsys, monkeypatch
):
    values = iter([3.0, 2.0, 2.5, 2.1, 1.0, 0.5, 0.4, 0.3])  # no improvement on 2.0 at steps 3 and 4

    def scripted(model, batches, *args):
        list(batches)
        return EvalResult(next(values), [0.25])

    monkeypatch.setattr(validation, "evaluate", scripted)  # validate calls it
    out = tmp_path / "early"
    flags = ["--max_steps", "8", "--eval_ratio", "0.25", "--eval_steps", "1", "--early_stopping_patience", "2"]
    code, err = run_cli("sft", sft_args(model_dir, train_file, out, *flags, "--load_best_model_at_end"), capsys)
    assert code == 0, err
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    said = " ".join(err.split())
    assert "early stopping at step 4 of 8: eval_task_loss has not improved for 2 validations" in said
    assert "best validation: step 2, eval_task_loss 2.0000" in said and "from checkpoint-2" in said
    saved, best = load_file(out / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(saved[k], best[k]) for k in saved)


# ---- flags -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "argv", "message"),
    [
        (SFTConfig, ["--eval_file", "v.jsonl", "--eval_ratio", "0.1"], r"--eval_file and --eval_ratio .* only one"),
        (SFTConfig, ["--eval_split", "test", "--eval_ratio", "0.1"], r"--eval_split and --eval_ratio"),
        (SFTConfig, ["--load_best_model_at_end"], r"--load_best_model_at_end needs validation records; add --eval_f"),
        (SFTConfig, ["--eval_steps", "5", "--early_stopping_patience", "2"], r"--eval_steps, --early_stopping_pati"),
        (SFTConfig, ["--eval_ratio", "1.5"], r"--eval_ratio .* between 0 and 1 .* got 1.5"),
        (SFTConfig, ["--eval_ratio", "0.1", "--eval_steps", "0"], r"--eval_steps must be at least 1"),
        (SFTConfig, ["--eval_ratio", "0.1", "--early_stopping_patience", "0"], r"--early_stopping_patience must be"),
        (SFTConfig, ["--eval_ratio", "0.1", "--per_device_eval_batch_size", "0"], r"--per_device_eval_batch_size m"),
        (
            SFTConfig,
            ["--eval_ratio", "0.1", "--metric_for_best_model", "eval_loss"],
            r"(?s)unknown --metric_for_best_model 'eval_loss'\. Did you mean 'eval_task_loss'\?.*eval_task_loss: lower",
        ),
        (
            DPOConfig,
            ["--eval_ratio", "0.1", "--metric_for_best_model", "accuracy"],
            r"eval_task_loss: lower is better\n  eval_reward_accuracy: higher is better\n  eval_reward_margin",
        ),
        (
            DPOConfig,
            ["--eval_ratio", "0.1", "--load_best_model_at_end", "--eval_steps", "30"],
            r"--save_steps 500 is not a multiple of --eval_steps 30\. Pass --save_steps 480",
        ),
    ],
)
def test_validation_flag_errors_name_the_flags_and_the_fix(cls, argv, message):
    with pytest.raises(LoptError, match=message):
        parse_config([*argv, "--output_dir", "o"], cls)


def test_a_grpo_validation_batch_that_splits_a_group_names_the_flag_and_the_fix():
    # the number of processes is known at launch: `lopt grpo` checks the batches before anything loads
    config = parse_config(
        ["--eval_ratio", "0.1", "--per_device_eval_batch_size", "3", "--num_generations", "2", "--output_dir", "o"],
        GRPOConfig,
    )
    with pytest.raises(
        LoptError, match=r"does not divide the 3 completions validated at a time .* use --per_device_eval_batch_size 4"
    ):
        check_before_loading(config)


def test_the_defaults_and_accepted_combinations():
    sft_config = parse_config(["--output_dir", "o", "--eval_ratio", "0.1", "--logging_steps", "7"])
    assert (sft_config.metric_for_best_model, sft_config.per_device_eval_batch_size) == ("eval_task_loss", 8)
    assert eval_steps(sft_config) == 7  # as transformers: --logging_steps
    assert parse_config(["--output_dir", "o", "--eval_ratio", "0.1"], GRPOConfig).metric_for_best_model == "eval_reward"
    # lopt sft keeps the best validation's checkpoint itself: --save_steps need not be a multiple
    parse_config(["--output_dir", "o", "--eval_ratio", "0.1", "--load_best_model_at_end", "--eval_steps", "30"])


def test_eval_split_of_generated_data_is_refused_before_the_model_loads(model_dir, tmp_path, capsys):
    args = ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "o"), "--eval_split", "test"]
    code, err = run_cli("sft", args, capsys)
    assert code == 2 and "generated offline and has no splits" in " ".join(err.split())
    assert "--eval_ratio" in err and "loading" not in err


def test_eval_split_reads_that_split_of_a_saved_dataset_dict(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(SFT_RECORDS), "validation": datasets.Dataset.from_list(EVAL_RECORDS)}
    ).save_to_disk(str(folder))
    config = parse_config(["--train_file", str(folder), "--output_dir", "o", "--eval_split", "validation"])
    assert with_validation(config, lambda **o: sft_records(config, **o), generated=False) == (SFT_RECORDS, EVAL_RECORDS)
    config.eval_split = "valid"
    with pytest.raises(LoptError, match=r"unknown --eval_split of .* 'valid'\. Did you mean 'validation'"):
        with_validation(config, lambda **o: sft_records(config, **o), generated=False)
    # a plain file has no other split: validating on it would validate on the training records
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_RECORDS))
    config.train_file = str(tmp_path / "train.jsonl")
    with pytest.raises(LoptError, match=r"--eval_split valid: --train_file .*train\.jsonl holds one set of records"):
        with_validation(config, lambda **o: sft_records(config, **o), generated=False)


# ---- readers of metrics.jsonl ----------------------------------------------------------------------------


def test_readers_take_validation_rows_and_rows_from_before_validation():
    row = StepMetrics(
        step=4, epoch=0.5, task_loss=1.5, aux_loss=[0.25], lr=1e-3, lr_k1=1e-3, grad_norm=2.0, tokens_per_s=10.0,
        peak_mem_bytes=7, activation_peak_bytes=5, elapsed_s=1.0, eval_task_loss=1.75, eval_aux_loss=[0.5],
        recipe={"kl": None},
    )  # fmt: skip
    assert contract_errors(row.to_json(), RECIPES["sft"]) == []
    scalars = tracker_scalars(row)
    assert scalars["eval/lopt/task_loss"] == 1.75 and scalars["eval/lopt/aux_loss_block_1"] == 0.5
    assert scalars["train/lopt/task_loss"] == 1.5
    assert step_metrics(row.to_json()) == row  # lopt watch reads it back
    state = DashboardState()
    state.record_metrics(row)
    screen = Console(record=True, width=120)
    screen.print(training_panel(state))
    text = screen.export_text()
    assert "eval task loss" in text and "1.7500" in text
    old = {k: v for k, v in row.to_json().items() if not k.startswith("eval_")}
    assert step_metrics(old).eval_task_loss is None  # a file written before validation existed
    broken = {**row.to_json(), "eval_aux_loss": None}
    assert any("null together" in e for e in contract_errors(broken, RECIPES["sft"]))
    assert any(
        "eval_task_loss must be" in e
        for e in contract_errors({**row.to_json(), "eval_task_loss": math.nan}, RECIPES["sft"])
    )


# ---- GRPO and DPO, through TRL's evaluation ----------------------------------------------------------------


def test_dpo_with_eval_ratio_logs_validation_rows(model_dir, tmp_path, capsys):
    out = tmp_path / "dpo"
    flags = ["--max_samples", "8", "--max_steps", "3", "--eval_ratio", "0.25", "--eval_steps", "2"]
    flags += ["--logging_steps", "10", "--load_best_model_at_end", "--save_steps", "2"]
    code, err = run_cli("dpo", dpo_flags(model_dir, out, *flags), capsys)
    assert code == 0, err
    logged = rows(out)
    assert [r["step"] for r in logged] == [2, 3]  # validated at step 2 and at the end
    assert all(contract_errors(r, RECIPES["dpo"]) == [] for r in logged)
    for r in logged:
        assert r["eval_task_loss"] > 0 and len(r["eval_aux_loss"]) == 1 and r["eval_aux_loss"][0] > 0
        assert 0 <= r["eval_reward_accuracy"] <= 1
    assert "best validation: step" in err


def test_grpo_with_eval_ratio_logs_validation_rows_and_no_validation_completions(model_dir, tmp_path):
    from lopt.recipes.grpo import run_grpo

    out = tmp_path / "grpo"
    config = grpo_config(
        model_dir, out, "--max_samples", "6", "--max_steps", "2", "--eval_ratio", "0.34", "--eval_steps", "1",
        "--per_device_eval_batch_size", "2",
    )  # fmt: skip
    result = run_grpo(config)
    assert [r["step"] for r in result.metrics] == [1, 2]
    assert all(contract_errors(r, RECIPES["grpo"]) == [] for r in result.metrics)
    assert all(r["eval_reward"] is not None and len(r["eval_aux_loss"]) == 1 for r in result.metrics)
    completions = (out / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 2 * 2  # the training steps' completions only, 2 per step
