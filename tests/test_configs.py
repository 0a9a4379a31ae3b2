"""The run configs in configs/: each parses as its recipe's config, each CPU smoke config runs, each GPU one is real.

A config's recipe, method and size come from its name, `<recipe>_<e2e|lopt_kN>_<cpu|gpu>.yaml`; the accelerate
launch configs (`accelerate_*.yaml`) are not run configs and are left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lopt.cli import main
from lopt.config import DPOConfig, GRPOConfig, RLOOConfig, RMConfig, SFTConfig, parse_config
from lopt.models.registry import ALIASES, EMBEDDED, EMBEDDED_HUB_ID

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"sft": SFTConfig, "grpo": GRPOConfig, "dpo": DPOConfig}
NAME = re.compile(r"(?P<recipe>sft|grpo|dpo)_(?P<method>e2e|lopt_k(?P<k>\d+))_(?P<size>cpu|gpu)\.yaml")
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accelerate_"))
CPU_CONFIGS = [p for p in RUN_CONFIGS if p.name.endswith("_cpu.yaml")]
GPU_CONFIGS = [p for p in RUN_CONFIGS if p.name.endswith("_gpu.yaml")]

# What a 1-step run on the tiny test model needs, on top of each config: few samples, one micro-batch, and
# lengths for the tiny byte-level tokenizer, which spells a gsm-symbolic problem in about four times the
# tokens of a real one (so the configs' lengths would cut every answer off).
SMOKE = ["--max_steps", "1", "--max_samples", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1"]
TINY = {
    "sft": ["--per_device_train_batch_size", "2", "--max_seq_length", "2048"],
    "grpo": [
        "--per_device_train_batch_size",
        "2",
        "--num_generations",
        "2",
        "--max_prompt_length",
        "1024",
        "--max_completion_length",
        "8",
    ],
    "dpo": ["--per_device_train_batch_size", "2", "--max_seq_length", "2048"],
}


def parts(path: Path) -> re.Match:
    match = NAME.fullmatch(path.name)
    assert match, f"{path.name}: name run configs <sft|grpo|dpo>_<e2e|lopt_kN>_<cpu|gpu>.yaml"
    return match


def parse(path: Path, *extra: str):
    recipe = parts(path)["recipe"]
    return parse_config(["--config", str(path), *extra], RECIPES[recipe], prog=f"lopt {recipe}")


def test_every_recipe_has_an_e2e_and_a_lopt_config_at_both_sizes():
    found = {(m["recipe"], m["method"].split("_")[0], m["size"]) for m in map(parts, RUN_CONFIGS)}
    wanted = {(r, m, s) for r in RECIPES for m in ("e2e", "lopt") for s in ("cpu", "gpu")}
    assert wanted <= found, f"missing: {sorted(wanted - found)}"


# The keys in which an E2E config and its LoPT twin may differ: the method's own, and where the run writes.
METHOD_KEYS = {"method", "num_blocks", "early_blocks", "aux_loss", "lambda_aux", "lr_k1", "backward", "output_dir"}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_e2e_and_lopt_twins_differ_only_in_the_method(recipe, size):
    """So that a run of each compares the methods, nothing else."""
    e2e, lopt = (
        {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in METHOD_KEYS}
        for path in (CONFIGS / f"{recipe}_e2e_{size}.yaml", CONFIGS / f"{recipe}_lopt_k2_{size}.yaml")
    )
    assert e2e == lopt


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_config_parses_as_its_recipe_and_matches_its_name(path):
    match = parts(path)
    config = parse(path)  # unknown keys, wrong types and invalid values are refused here
    assert isinstance(config, RECIPES[match["recipe"]])
    assert config.canonical_method == match["method"].split("_")[0]
    if match["k"]:
        assert config.num_blocks == int(match["k"])
    assert config.output_dir and config.max_steps > 0
    header = path.read_text().split("\n", 6)
    assert f"lopt {match['recipe']} --config configs/{path.name}" in "".join(header[:6]), "header names its command"


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_config_is_a_real_single_gpu_run(path):
    config = parse(path)
    name = config.model_name_or_path
    assert ALIASES.get(name, name) not in (EMBEDDED, EMBEDDED_HUB_ID), f"{path.name}: names the embedded model"
    assert config.bf16 is True and not config.fp16
    assert "report_to" not in config.explicit  # left to the user


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: p.name)
def test_cpu_config_runs_a_step(path, model_dir, tmp_path):
    recipe = parts(path)["recipe"]
    assert parse(path).model_name_or_path == "smollm2-135m"  # the smoke configs run offline, anywhere
    out = tmp_path / "run"
    flags = ["--config", str(path), "--model_name_or_path", str(model_dir), "--output_dir", str(out)]
    assert main([recipe, *flags, *SMOKE, *TINY[recipe]]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]


RLHF = Path(__file__).resolve().parents[1] / "examples" / "rlhf"
RLHF_STAGES = {"sft": SFTConfig, "rm": RMConfig, "rloo": RLOOConfig}


@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_the_rlhf_example_chains_its_stages_through_their_output_folders(size):
    """examples/rlhf: SFT -> reward model -> RLOO, each stage reading the folder the one before writes."""
    configs = {
        stage: parse_config(["--config", str(RLHF / f"{stage}_{size}.yaml")], cls, prog=f"lopt {stage}")
        for stage, cls in RLHF_STAGES.items()
    }
    sft, rm, rloo = configs["sft"], configs["rm"], configs["rloo"]
    assert rm.model_name_or_path == rloo.model_name_or_path == sft.output_dir
    assert rloo.reward_model == rm.output_dir and rloo.beta > 0
    assert all(config.canonical_method == "lopt" for config in configs.values())
    for stage in RLHF_STAGES:
        text = (RLHF / f"{stage}_{size}.yaml").read_text()
        assert f"lopt {stage} --config examples/rlhf/{stage}_{size}.yaml" in text, "the header names its command"
