"""--block_step: each block's parameters take their optimizer step right after the block's backward.

With local backward a block's gradients are final once its own backward has run, so its step can happen then and its
gradients be freed: at most one block's gradients are alive. The step must equal a reference written out here (the
whole step's gradients first, then each block clipped by its own norm and AdamW applied), and a resumed run must
end where an uninterrupted one does.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lopt.cli import main
from lopt.config import SFTConfig, parse_config
from lopt.errors import LoptError
from lopt.models.local_learning import LocalLearningLM
from lopt.parallel.deepspeed import DeepSpeedBackend, ZeroSettings
from lopt.parallel.fsdp import FSDPBackend, FSDPSettings
from lopt.parallel.replicated import ReplicatedBackend
from lopt.training.optim import build_optimizer
from lopt.training.step import forward_backward
from resume_check import assert_resumed_to, stop_after_checkpoint
from tiny_models import FAMILIES, tiny_batch, tiny_model

MAX_GRAD_NORM = 0.005  # small enough that every block is clipped, and by its own factor


def _names(model: torch.nn.Module, parameters) -> set[str]:
    ids = {id(p) for p in parameters}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_blocks", [2, 3])
def test_the_blocks_parameters_partition_what_trains(family, num_blocks):
    model = LocalLearningLM(tiny_model(family, layers=6), num_blocks=num_blocks)
    blocks = model.block_parameters()
    assert len(blocks) == num_blocks
    named = [_names(model, block) for block in blocks]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*named) == trained and sum(map(len, named)) == len(trained)  # each parameter once
    assert any("aux_heads.0" in n for n in named[0]) and any("embed" in n or "wte" in n for n in named[0])
    assert not any("aux_heads" in n for n in named[-1])


def _config(tmp_path, *flags) -> SFTConfig:
    return parse_config(["--output_dir", str(tmp_path), "--max_grad_norm", str(MAX_GRAD_NORM), *flags], SFTConfig)


def _block_step(model, optimizer, backend, seen):
    def step_block(block: int) -> None:
        # only this block's gradients are alive when it steps: the earlier ones were freed by their steps
        seen.append(_names(model, [p for p in model.parameters() if p.grad is not None]))
        backend.step_block(model.block_parameters()[block], optimizer, lambda norm: None)

    return step_block


def test_block_steps_equal_the_whole_steps_gradients_clipped_per_block(tmp_path):
    backend = ReplicatedBackend(torch.device("cpu"), _config(tmp_path))
    stepped = LocalLearningLM(tiny_model(layers=6), num_blocks=3).train()
    reference = LocalLearningLM(tiny_model(layers=6), num_blocks=3).train()
    optimizers = [build_optimizer(m, 1e-2, 5e-3, 0.01) for m in (stepped, reference)]
    for batch_seed in (1, 2):  # two steps: AdamW's moments carry over
        batch = tiny_batch(batch=3, seq=10, seed=batch_seed)
        seen = []
        forward_backward(stepped, [batch], step_block=_block_step(stepped, optimizers[0], backend, seen))
        assert seen == [_names(stepped, block) for block in stepped.block_parameters()]
        assert all(p.grad is None for p in stepped.parameters())  # every block's gradients freed after its step

        forward_backward(reference, [batch])
        scales = []
        for block in reference.block_parameters():
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in block))
            scale = torch.clamp(MAX_GRAD_NORM / (norm + 1e-6), max=1.0)  # torch's clip_grad_norm_, written out
            for p in block:
                p.grad.mul_(scale)
            scales.append(float(scale))
        assert max(scales) < 1.0 and max(scales) / min(scales) > 10  # every block clipped, each by its own factor
        optimizers[1].step()
        optimizers[1].zero_grad(set_to_none=True)
        for (name, a), b in zip(stepped.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_global_clipping_would_give_other_weights(tmp_path):
    """The reference above is sensitive to the clipping rule: clipping the whole gradient by its global norm
    ends elsewhere, so per-block clipping is what --block_step does (and what --help says)."""
    backend = ReplicatedBackend(torch.device("cpu"), _config(tmp_path))
    stepped = LocalLearningLM(tiny_model(layers=6), num_blocks=3).train()
    whole = LocalLearningLM(tiny_model(layers=6), num_blocks=3).train()
    optimizers = [build_optimizer(m, 1e-2, None, 0.0) for m in (stepped, whole)]
    batch = tiny_batch(batch=3, seq=10)
    forward_backward(stepped, [batch], step_block=_block_step(stepped, optimizers[0], backend, []))
    forward_backward(whole, [batch])
    backend.step(whole, optimizers[1], lambda norm, step_taken: None)
    differs = max(float((a - b).abs().max()) for a, b in zip(stepped.parameters(), whole.parameters(), strict=True))
    assert differs > 1e-4


RECORDS = [{"question": f"What is {a} + {b}?", "answer": f"It is {a + b}."} for a in range(4) for b in range(3)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs(layers=6)


def _sft(model_dir, train_file, out, *extra) -> int:
    return main([
        "sft", "--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
        "--method", "lopt", "--num_blocks", "3", "--block_step", "--max_steps", "4", "--save_steps", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler_type", "linear",
        "--warmup_ratio", "0.25", "--logging_steps", "1", "--max_grad_norm", "0.5", *extra,
    ])  # fmt: skip


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])  # --optim's state is checkpointed and restored
def test_a_block_step_run_logs_its_norm_and_resumes_to_the_uninterrupted_weights(model_dir, tmp_path, capsys, optim):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert _sft(model_dir, train_file, tmp_path / "whole", "--optim", optim) == 0
    assert "per-block optimizer steps" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in rows)

    out = tmp_path / "whole"
    straight = stop_after_checkpoint(out)  # the latest checkpoint is checkpoint-2
    assert _sft(model_dir, train_file, out, "--optim", optim, "--resume_from_checkpoint", "latest") == 0
    assert "resumed from" in capsys.readouterr().err
    assert_resumed_to(out, straight)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "e2e"], "--block_step needs --method lopt"),
        (["--backward", "joint"], "--block_step needs --backward local"),
        (["--gradient_accumulation_steps", "2"], "--block_step needs --gradient_accumulation_steps 1"),
        (["--fp16"], "--block_step with --fp16"),
    ],
)
def test_what_block_steps_cannot_do_is_refused_by_name(flags, message, tmp_path):
    with pytest.raises(LoptError, match=message):
        _config(tmp_path, "--method", "lopt", "--block_step", *flags)


def test_sharded_backends_refuse_block_steps(tmp_path):
    config = _config(tmp_path, "--method", "lopt", "--block_step")
    with pytest.raises(LoptError, match="--block_step under FSDP2"):
        FSDPBackend(torch.device("cpu"), config, FSDPSettings())
    with pytest.raises(LoptError, match="--block_step under DeepSpeed ZeRO-2"):
        DeepSpeedBackend(torch.device("cpu"), ZeroSettings(stage=2), config)


def _two_process_worker(rank: int, out_dir: str) -> None:
    from lopt.parallel.distributed import all_reduce_gradients

    backend = ReplicatedBackend(torch.device("cpu"), SimpleNamespace(max_grad_norm=0, fp16=False))  # no clip
    stepped, whole = (LocalLearningLM(tiny_model(layers=6), num_blocks=3).train() for _ in range(2))
    optimizers = [build_optimizer(m, 1e-2, None, 0.0) for m in (stepped, whole)]
    half = {k: v[rank::2] for k, v in tiny_batch(batch=4, seq=10, seed=7).items()}
    forward_backward(stepped, [half], step_block=_block_step(stepped, optimizers[0], backend, []))
    forward_backward(whole, [half])
    all_reduce_gradients([p for p in whole.parameters() if p.requires_grad])
    optimizers[1].step()
    torch.save({"stepped": stepped.state_dict(), "whole": whole.state_dict()}, f"{out_dir}/rank{rank}.pt")


def test_two_processes_reduce_each_blocks_gradients_before_its_step(tmp_path):
    """Data parallel: each block's gradients are averaged over the processes before its step, so without clipping
    the block steps end where the whole step does, on both processes."""
    from test_distributed import spawn

    spawn(_two_process_worker, str(tmp_path / "init"), str(tmp_path))
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, expected in states[0]["whole"].items():
        for state in states:
            torch.testing.assert_close(state["stepped"][name], expected, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(state["whole"][name], expected, rtol=0, atol=0, msg=name)
