"""Integration: the SFT recipe and the memory claim on the embedded SmolLM2-135M (no hub)."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import AutoModelForCausalLM

from lopt.cli import main
from lopt.models.registry import load_model_and_tokenizer
from lopt.tools.bench.measure import Configuration, measure
from lopt.tools.bench.tables import add_ratios

pytestmark = pytest.mark.integration


def test_lopt_sft_on_the_embedded_model_saves_a_plain_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "sft",
            "--max_steps",
            "2",
            "--max_samples",
            "4",
            "--per_device_train_batch_size",
            "1",
            "--max_seq_length",
            "256",
            "--logging_steps",
            "1",
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(0.0 < r["task_loss"] < 5.0 for r in lines)  # an instruct model on worked math solutions
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings is False


def test_local_backward_saves_activation_memory_on_the_embedded_model():
    """Saved-for-backward bytes are deterministic: these are ratios, not timings."""
    base, _ = load_model_and_tokenizer("smollm2-135m")
    records = []
    for config in (
        Configuration("e2e", 1),
        Configuration("lopt-joint", 2),
        Configuration("lopt", 2),
        Configuration("lopt", 4),
    ):
        records.append(measure(copy.deepcopy(base), config, batch=1, seq=64, steps=1, warmup=0))
    add_ratios(records)
    ratio = {(r.method, r.k): r.activation_ratio for r in records}
    assert ratio[("lopt-joint", 2)] >= 0.95  # the reference's single backward keeps everything
    assert ratio[("lopt", 2)] <= 0.55
    assert ratio[("lopt", 4)] <= 0.32
