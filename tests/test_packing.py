"""--packing: whole examples packed into rows (best-fit decreasing) that train exactly like the examples unpacked.

The core check is a batch on which packed and unpacked must agree: the same examples once padded one per row and once
packed into fewer rows give the same task loss, local losses and gradients (E2E and LoPT, sdpa and eager attention,
with a KL reference too). Dropping the restarting positions, so that the examples of a row see each other, changes
the loss: the agreement is the block-diagonal mask's doing, not an accident of the data.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lopt.cli import main
from lopt.data.collate import IGNORE_INDEX, collate, pack_examples
from lopt.models.local_learning import LocalLearningLM
from lopt.training.step import forward_backward
from lopt.training.task_loss import FrozenStartingModel, KLRegularizedLoss
from tiny_models import VOCAB, tiny_model, tiny_model_dir


def examples(lengths: list[int], prompt: int = 3, seed: int = 0) -> list[dict]:
    """Random token examples of `lengths`, the first `prompt` tokens untrained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_best_fit_decreasing_fills_rows_with_whole_examples():
    data = examples([6, 5, 4, 3, 2], prompt=1)
    rows = pack_examples(data, max_seq_length=8)
    # 6 opens a row (2 left), 5 and 4 open rows (3 and 4 left); 3 fits best where 3 are left, 2 where 2 are left
    assert [r["position_ids"] for r in rows] == [
        [0, 1, 2, 3, 4, 5, 0, 1],
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3],
    ]
    assert rows[0]["input_ids"] == data[0]["input_ids"] + data[4]["input_ids"]
    assert rows[1]["input_ids"] == data[1]["input_ids"] + data[3]["input_ids"]
    # each example's first label is ignored (the previous example's last token would predict it), the rest kept
    assert rows[0]["labels"] == [IGNORE_INDEX, *data[0]["labels"][1:], IGNORE_INDEX, *data[4]["labels"][1:]]


def test_every_example_lands_once_and_no_row_is_over_the_limit():
    lengths = [int(n) for n in torch.randint(1, 40, (200,), generator=torch.Generator().manual_seed(3))]
    data = examples(lengths, prompt=1)
    rows = pack_examples(data, max_seq_length=64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    pieces = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        pieces += [tuple(row["input_ids"][a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    assert sorted(pieces) == sorted(tuple(d["input_ids"]) for d in data)
    assert len(rows) <= -(-sum(lengths) // 64) + 1  # best-fit decreasing is within a row of the bound here
    assert pack_examples(data, max_seq_length=64) == rows  # deterministic: resume sees the same rows


def test_collated_packed_rows_pad_as_a_sequence_of_their_own():
    rows = pack_examples(examples([5, 3, 2], prompt=1), max_seq_length=7)  # 5 + 2 | 3
    batch = collate(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 4
    assert "position_ids" not in collate(examples([5, 3]), pad_token_id=0)  # unpacked batches are as before


def _step(model: LocalLearningLM, batch: dict, task_loss=None):
    model.zero_grad(set_to_none=True)
    result = forward_backward(model, [batch], task_loss=task_loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("num_blocks", [1, 2])
def test_a_packed_batch_trains_like_the_same_examples_unpacked(attention, num_blocks):
    data = examples([13, 9, 7, 5, 4])
    base = tiny_model(layers=4)
    base.config._attn_implementation = attention
    model = LocalLearningLM(base, num_blocks=num_blocks).train()
    unpacked, unpacked_grads = _step(model, collate(data, pad_token_id=0))
    rows = pack_examples(data, max_seq_length=16)
    assert [len(r["input_ids"]) for r in rows] == [13, 16, 9]  # 13 | 9 + 7 | 5 + 4
    packed, packed_grads = _step(model, collate(rows, pad_token_id=0))

    assert packed.tokens == unpacked.tokens and packed.input_tokens == unpacked.input_tokens == sum([13, 9, 7, 5, 4])
    assert packed.task_loss == pytest.approx(unpacked.task_loss, rel=1e-5)
    assert packed.aux_losses == pytest.approx(unpacked.aux_losses, rel=1e-5)
    assert packed_grads.keys() == unpacked_grads.keys()
    for name, grad in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # without the restarting positions the examples of a row attend to each other: loss and gradients move by far
    # more than the tolerance above
    crossed = collate(rows, pad_token_id=0)
    del crossed["position_ids"]
    contaminated, contaminated_grads = _step(model, crossed)
    assert contaminated.task_loss != pytest.approx(unpacked.task_loss, rel=2e-5)
    worst = max(float((contaminated_grads[n] - g).abs().max() / g.abs().max()) for n, g in unpacked_grads.items())
    assert worst > 0.05


def test_the_kl_reference_sees_packed_rows_as_the_policy_does():
    data = examples([11, 8, 6, 3])
    model = LocalLearningLM(tiny_model(layers=4, seed=0), num_blocks=2).train()
    loss = KLRegularizedLoss(beta=0.5, reference=FrozenStartingModel(tiny_model(layers=4, seed=1)))
    unpacked, _ = _step(model, collate(data, pad_token_id=0), loss)
    packed, _ = _step(model, collate(pack_examples(data, max_seq_length=16), pad_token_id=0), loss)
    assert unpacked.terms["kl"] > 0.01  # two different models: a KL that a wrong mask would change
    assert packed.terms["kl"] == pytest.approx(unpacked.terms["kl"], rel=1e-5)
    assert packed.task_loss == pytest.approx(unpacked.task_loss, rel=1e-5)


RECORDS = [{"question": f"What is {a} + {b}?", "answer": f"{a + b}" * (1 + a)} for a in range(6) for b in range(4)]


def test_lopt_sft_with_packing_trains_on_fewer_fuller_sequences(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "model")
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    common = [
        "--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--max_seq_length", "256",
        "--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--logging_steps", "1", "--save_steps", "0",
    ]  # fmt: skip
    assert main(["sft", *common, "--output_dir", str(tmp_path / "plain")]) == 0
    assert main(["sft", *common, "--packing", "--output_dir", str(tmp_path / "packed")]) == 0
    err = capsys.readouterr().err
    found = re.search(r"packed into (\d+) sequences of up to 256 tokens \((\d+\.\d)% filled\)", err)
    rows, filled = int(found.group(1)), float(found.group(2))
    tokens = int(re.search(r"trained tokens of ([\d,]+)", err).group(1).replace(",", ""))
    assert rows < len(RECORDS) // 4  # the examples are short: several share a row
    assert filled == pytest.approx(100 * tokens / (rows * 256), abs=0.05)

    def logged(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    plain, packed = logged("plain"), logged("packed")
    assert len(plain) == len(RECORDS) // 2 and len(packed) == -(-rows // 2)  # a step per 2 examples, per 2 rows
    assert [r["step"] for r in packed] == list(range(1, len(packed) + 1))
    assert (tmp_path / "packed" / "model.safetensors").is_file()
    # `lopt data preview --packing` reports the rows the run trains on
    assert main(["data", "preview", *common, "--packing", "--num_examples", "0"]) == 0
    assert f"--packing: {found.group(0)}" in capsys.readouterr().out
