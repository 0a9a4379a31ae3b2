"""The blocks' scales: --aux_loss recon_normalized (a local loss on one scale at every depth), each block's gradient
norm (metrics.jsonl's block_grad_norm) and --clip_per_block (each block clipped by its own norm)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lopt.cli import main
from lopt.config import SFTConfig, parse_config, validate
from lopt.dashboard.watch import step_metrics
from lopt.errors import LoptError
from lopt.models.local_learning import (
    RECONSTRUCTION_LOSSES,
    VARIANCE_EPS,
    LocalLearningLM,
    normalized_squared_error,
    squared_error,
)
from lopt.parallel.deepspeed import DeepSpeedBackend, ZeroSettings
from lopt.parallel.fsdp import FSDPSettings, shard_model
from lopt.parallel.replicated import ReplicatedBackend
from lopt.recipes.registry import RECIPES
from lopt.training.metrics import FIELDS, StepMetrics, contract_errors
from lopt.training.optim import clip_gradients
from lopt.training.run import build_model
from lopt.training.step import forward_backward
from lopt.training.trackers import tracker_scalars
from test_distributed import WORLD, _halves, _wrapped, spawn
from test_dpo import dpo_flags
from tiny_data import SFT_RECORDS, sft_args, write_jsonl
from tiny_models import tiny_batch, tiny_model, tiny_model_dir

# ---- --aux_loss recon_normalized -----------------------------------------------------------------------------------


def test_recon_normalized_is_invariant_to_the_hidden_states_scale_and_recon_is_not():
    torch.manual_seed(0)
    target = torch.randn(2, 5, 16)
    prediction = target + 0.3 * torch.randn(2, 5, 16)  # a head's reconstruction, some error off
    normalized = normalized_squared_error(prediction, target)
    # a block whose residual stream is 100 times larger, reconstructed to the same relative error
    torch.testing.assert_close(normalized_squared_error(100 * prediction, 100 * target), normalized, rtol=1e-5, atol=0)
    torch.testing.assert_close(squared_error(100 * prediction, 100 * target), 1e4 * squared_error(prediction, target))


def test_recon_normalized_equals_the_hand_computation():
    prediction = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    target = torch.tensor([[[0.0, 2.0, 4.0, 6.0]]])
    # errors 1, 0, -1, -2: mean square 6 / 4; the target's mean 3, its variance (9 + 1 + 1 + 9) / 4 = 5
    assert squared_error(prediction, target).item() == pytest.approx(1.5)
    assert normalized_squared_error(prediction, target).item() == pytest.approx(1.5 / (5 + VARIANCE_EPS), rel=1e-6)
    # predicting each token's mean scores 1 whatever the scale
    mean = target.mean(dim=-1, keepdim=True).expand_as(target)
    assert normalized_squared_error(1e3 * mean, 1e3 * target).item() == pytest.approx(1.0, rel=1e-6)


def test_a_blocks_local_loss_is_the_chosen_error_over_real_tokens():
    """Through the wrapper: block 1's local loss is recon_normalized of head(block output) against the block input,
    averaged over the tokens the attention mask keeps."""
    torch.manual_seed(1)
    model = LocalLearningLM(tiny_model(layers=4), num_blocks=2, aux_loss="recon_normalized")
    seen = {}  # block 1 is layers 0 and 1; these hooks run after the wrapper's, which detach but change no value
    model.parts.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(input=args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    model.parts.layers[1].register_forward_hook(
        lambda m, args, output: seen.update(output=output[0] if isinstance(output, tuple) else output)
    )
    batch = tiny_batch(batch=2, seq=6)
    batch["attention_mask"][1, 4:] = 0  # padding takes no part in the local loss
    with torch.no_grad(), model.boundary_step(None, 0.0, batch["attention_mask"], measure=True) as losses:
        model.hidden_states(batch["input_ids"], batch["attention_mask"])
        per_token = normalized_squared_error(model.aux_heads[0](seen["output"]), seen["input"])
    mask = batch["attention_mask"].float()
    torch.testing.assert_close(losses[0], (per_token * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


def test_aux_loss_reaches_the_wrapper_and_an_unknown_one_is_refused(tmp_path):
    config = SFTConfig(
        model_name_or_path=str(tiny_model_dir(tmp_path / "model")), output_dir=str(tmp_path / "out"),
        aux_loss="recon_normalized",
    )  # fmt: skip
    model, _ = build_model(config, torch.device("cpu"))
    assert model.aux_loss == "recon_normalized"
    assert SFTConfig.__dataclass_fields__["aux_loss"].metadata["choices"] == list(RECONSTRUCTION_LOSSES)
    with pytest.raises(LoptError, match="unknown --aux_loss 'recon_norm'. Did you mean 'recon_normalized'"):
        validate(SFTConfig(aux_loss="recon_norm", output_dir=str(tmp_path / "out")))
    with pytest.raises(LoptError, match="unknown --aux_loss 'mse'"):
        LocalLearningLM(tiny_model(), num_blocks=2, aux_loss="mse")
    with pytest.raises(LoptError, match="--aux_loss applies to --method lopt only"):
        parse_config(["--output_dir", str(tmp_path), "--method", "e2e", "--aux_loss", "recon_normalized"])


# ---- each block's gradient norm, and clipping ----------------------------------------------------------------------


def _gradients(num_blocks: int, lambda_aux: float = 10.0) -> LocalLearningLM:
    torch.manual_seed(2)  # the heads
    model = LocalLearningLM(tiny_model(layers=4, seed=3), num_blocks=num_blocks, lambda_aux=lambda_aux).train()
    forward_backward(model, [tiny_batch(batch=2, seq=8, seed=4)])
    return model


def _grads(model: LocalLearningLM) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("num_blocks", [1, 2, 4])
def test_the_blocks_norms_square_sum_to_the_global_norm_and_global_clipping_is_torchs(num_blocks):
    model, reference = _gradients(num_blocks), _gradients(num_blocks)
    trained = [p for p in reference.parameters() if p.requires_grad]
    global_norm = float(torch.nn.utils.clip_grad_norm_(trained, 0.01))  # what the loop logged as grad_norm
    norms = clip_gradients(model.block_parameters(), 0.01, per_block=False)
    assert len(norms) == num_blocks and all(n > 0 for n in norms)
    assert math.hypot(*norms) == pytest.approx(global_norm, rel=1e-5)
    for a, b in zip(_grads(model), _grads(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)  # one factor for all, as torch clips


@pytest.mark.parametrize("num_blocks", [2, 4])
def test_clipping_per_block_bounds_each_block_and_leaves_small_ones_alone(num_blocks):
    model = _gradients(num_blocks, lambda_aux=1e3)  # large local gradients: the early blocks' norms stand out
    blocks = model.block_parameters()
    before = [[p.grad.clone() for p in block] for block in blocks]
    norms = clip_gradients(blocks, math.inf, per_block=True)  # inf: measured, nothing clipped
    limit = math.sqrt(min(norms) * max(norms))
    assert min(norms) < limit < max(norms)
    assert clip_gradients(blocks, limit, per_block=True) == pytest.approx(norms, rel=1e-6)  # the norms before
    after = clip_gradients(blocks, math.inf, per_block=True)
    for norm, clipped, grads, block in zip(norms, after, before, blocks, strict=True):
        if norm > limit:
            assert clipped == pytest.approx(limit, rel=1e-4)
            for p, g in zip(block, grads, strict=True):  # the block's direction is kept
                torch.testing.assert_close(p.grad, g * (limit / norm), rtol=1e-4, atol=1e-9)
        else:
            assert all(torch.equal(p.grad, g) for p, g in zip(block, grads, strict=True))


def test_clip_per_block_is_refused_where_it_cannot_act(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--clip_per_block"]
    with pytest.raises(LoptError, match=r"--clip_per_block needs --method lopt .*end-to-end training has one block"):
        parse_config([*flags, "--method", "e2e"])
    with pytest.raises(LoptError, match="--clip_per_block clips each block to --max_grad_norm, which is 0"):
        parse_config([*flags, "--max_grad_norm", "0"])
    config = parse_config([*flags, "--block_step"])  # --block_step clips each block by its own norm anyway
    assert config.clip_per_block and config.block_step


# ---- metrics.jsonl's block_grad_norm -------------------------------------------------------------------------------


def _row(**fields) -> StepMetrics:
    return StepMetrics(
        step=2, epoch=0.5, task_loss=1.5, aux_loss=[0.25], lr=1e-3, lr_k1=1e-3, grad_norm=5.0, tokens_per_s=10.0,
        peak_mem_bytes=7, activation_peak_bytes=5, elapsed_s=1.0, recipe={"kl": None}, **fields,
    )  # fmt: skip


def test_block_grad_norm_is_a_common_field_read_and_tracked_per_block():
    row = _row(block_grad_norm=[3.0, 4.0])
    written = row.to_json()
    assert list(written)[: len(FIELDS)] == list(FIELDS) and list(FIELDS).index("block_grad_norm") == 7
    assert contract_errors(written, RECIPES["sft"]) == [] and contract_errors(_row().to_json(), RECIPES["sft"]) == []
    assert contract_errors({**written, "block_grad_norm": []}, RECIPES["sft"])  # a list holds one norm per block
    assert step_metrics(written) == row
    older = {k: v for k, v in written.items() if k != "block_grad_norm"}  # a file from before the field
    assert step_metrics(older) == _row()
    scalars = tracker_scalars(row)
    assert scalars["train/lopt/grad_norm_block_1"] == 3.0 and scalars["train/lopt/grad_norm_block_2"] == 4.0
    assert not any("grad_norm_block" in name for name in tracker_scalars(_row()))


# ---- the SFT loop and the backends ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_model(tiny_model_dirs) -> Path:
    return tiny_model_dirs(layers=6)


def _sft_rows(sft_model, tmp_path, capsys, *flags) -> tuple[list[dict], str]:
    train_file = write_jsonl(tmp_path / "train.jsonl", SFT_RECORDS)
    out = tmp_path / "run"
    code = main(["sft", *sft_args(sft_model, train_file, out, "--max_steps", "2", "--logging_steps", "1", *flags)])
    err = capsys.readouterr().err
    assert code == 0, err
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], err


@pytest.mark.parametrize(
    ("flags", "blocks", "said"),
    [
        (["--method", "e2e"], 1, None),
        (["--num_blocks", "3", "--clip_per_block", "--max_grad_norm", "0.01"], 3, "each block clipped by its own"),
        (["--num_blocks", "3", "--block_step"], 3, "per-block optimizer steps"),
    ],
    ids=["e2e", "clip-per-block", "block-step"],
)
def test_an_sft_run_logs_each_blocks_gradient_norm(sft_model, tmp_path, capsys, flags, blocks, said):
    rows, err = _sft_rows(sft_model, tmp_path, capsys, *flags)
    assert all(contract_errors(row, RECIPES["sft"]) == [] for row in rows)
    for row in rows:
        assert len(row["block_grad_norm"]) == blocks
        assert math.hypot(*row["block_grad_norm"]) == pytest.approx(row["grad_norm"], rel=1e-6)
    assert said is None or said in err


class _Recorder(torch.optim.SGD):
    """An optimizer whose step only records the gradients it is handed (the backend zeroes them after)."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.clone() for group in self.param_groups for p in group["params"]}


def test_the_backend_clips_each_block_by_its_own_norm_with_clip_per_block(tmp_path):
    model, reference = _gradients(4, lambda_aux=1e3), _gradients(4, lambda_aux=1e3)
    norms = clip_gradients(reference.block_parameters(), math.inf, per_block=True)
    limit = math.sqrt(min(norms) * max(norms))
    config = parse_config(["--output_dir", str(tmp_path), "--clip_per_block", "--max_grad_norm", str(limit)])
    optimizer = _Recorder(model.parameters(), lr=1.0)
    grad_norm, block_norms = ReplicatedBackend(torch.device("cpu"), config).step(
        model, optimizer, lambda norm, step_taken: None
    )
    assert block_norms == pytest.approx(norms, rel=1e-6) and grad_norm == pytest.approx(math.hypot(*norms))
    clip_gradients(reference.block_parameters(), limit, per_block=True)
    for block, expected in zip(model.block_parameters(), reference.block_parameters(), strict=True):
        for p, q in zip(block, expected, strict=True):
            torch.testing.assert_close(optimizer.seen[id(p)], q.grad, rtol=1e-6, atol=0)
        assert float(torch.nn.utils.get_total_norm([optimizer.seen[id(p)] for p in block])) <= limit * (1 + 1e-5)


def test_deepspeed_refuses_clip_per_block(tmp_path):
    config = parse_config(["--output_dir", str(tmp_path), "--clip_per_block"])
    with pytest.raises(LoptError, match="--clip_per_block under DeepSpeed ZeRO-2: DeepSpeed clips by the global norm"):
        DeepSpeedBackend(torch.device("cpu"), ZeroSettings(stage=2), config)


def _sharded_norms_worker(rank: int, out_dir: str, num_blocks: int) -> None:
    model = _wrapped(num_blocks)
    shard_model(model, FSDPSettings(), torch.device("cpu"))
    forward_backward(model, [_halves(tiny_batch(batch=4, seed=5))[rank]])
    norms = clip_gradients(model.block_parameters(), 0.05, per_block=True)
    clipped = clip_gradients(model.block_parameters(), math.inf, per_block=False)
    torch.save({"norms": norms, "clipped": clipped}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_fsdp_shards_give_the_blocks_norms_of_one_process(tmp_path, num_blocks):
    spawn(_sharded_norms_worker, str(tmp_path / "init"), str(tmp_path), num_blocks)
    model = _wrapped(num_blocks)
    forward_backward(model, _halves(tiny_batch(batch=4, seed=5)))
    norms = clip_gradients(model.block_parameters(), 0.05, per_block=True)
    clipped = clip_gradients(model.block_parameters(), math.inf, per_block=False)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["norms"] == pytest.approx(norms, rel=1e-5) and got["clipped"] == pytest.approx(clipped, rel=1e-4)


@pytest.mark.parametrize(
    ("flags", "blocks", "said"),
    [
        (["--method", "e2e"], 1, None),
        (["--num_blocks", "2", "--clip_per_block", "--max_grad_norm", "0.01"], 2, "each block clipped by its own"),
    ],
    ids=["e2e", "lopt-clip-per-block"],
)
def test_a_trl_run_logs_each_blocks_gradient_norm(sft_model, tmp_path, capsys, flags, blocks, said):
    out = tmp_path / "dpo"
    assert main(["dpo", *dpo_flags(sft_model, out, "--max_steps", "2", *flags)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(contract_errors(row, RECIPES["dpo"]) == [] for row in rows)
    for row in rows:  # the norms before clipping, as SFT logs them: their squares sum to grad_norm's
        assert len(row["block_grad_norm"]) == blocks
        assert math.hypot(*row["block_grad_norm"]) == pytest.approx(row["grad_norm"], rel=1e-5)
    printed = capsys.readouterr()
    assert said is None or said in printed.out + printed.err
