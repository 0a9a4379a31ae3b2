"""Typed run configs: flags and YAML keys come from one dataclass, merged as defaults < YAML < CLI.

Every field of `SFTConfig` is a command-line flag (`--name`) and a YAML key (`name:`). Each value
remembers whether the user set it, so validation can tell a default from a choice (for example
`--method e2e` with an explicit `--num_blocks` is a conflict, the default is not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from lopt.data.formats import PROMPT_FORMATS
from lopt.data.sources import SELECT_SAMPLES
from lopt.errors import LoptError, did_you_mean, unknown_choice
from lopt.tasks import TASKS
from lopt.training.trackers import parse_report_to

METHODS = {"e2e": "e2e", "lopt": "lopt", "ll": "lopt"}  # 'll' is the reference implementation's name


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RunConfig:
    """The flags every recipe (sft, grpo, dpo) shares; each recipe's config adds its own."""

    # flags that must be at least 1; recipes extend the tuple with theirs
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
    )

    # model
    model_name_or_path: str = _opt("smollm2-135m", "alias (smollm2-135m, qwen3-4b, ...), local folder or hub id")
    trust_remote_code: bool = _opt(False, "allow the model's own code from the hub (off: it runs remote code)")
    # method
    method: str = _opt(
        "lopt", "lopt (alias ll): local learning in k blocks; e2e: the end-to-end baseline", choices=sorted(METHODS)
    )
    num_blocks: int = _opt(2, "LoPT: number of contiguous blocks k (2 .. number of layers)")
    early_blocks: str = _opt(
        "recon",
        "LoPT: recon (local reconstruction loss) or frozen (ablation: early blocks not trained)",
        choices=["recon", "frozen"],
    )
    aux_loss: str = _opt("recon", "LoPT: local objective of the non-final blocks", choices=["recon"])
    lambda_aux: float = _opt(10.0, "LoPT: weight of the mean local loss in the objective")
    lr_k1: float | None = _opt(
        None, "LoPT: learning rate of embeddings, early blocks and heads (default: --learning_rate)"
    )
    backward: str = _opt(
        "local",
        "LoPT: local (block by block, frees activations) or joint (one backward, as the reference)",
        choices=["local", "joint"],
    )
    # data
    dataset_name: str | None = _opt(None, "hub dataset id (overrides --dataset_preset / --task's own data)")
    dataset_config: str | None = _opt(None, "hub dataset config name")
    train_file: str | None = _opt(
        None, "local .json / .jsonl / .parquet file (overrides --dataset_name and the preset)"
    )
    split: str = _opt("train", "dataset split")
    max_samples: int | None = _opt(None, "keep N records, picked as --select_samples says")
    select_samples: str = _opt(
        "first",
        "how --max_samples picks records: first (the first N) or random (N drawn after a shuffle seeded by "
        "--seed); the generated gsm-symbolic data is exactly N random problems from --seed either way",
        choices=list(SELECT_SAMPLES),
    )
    # optimization
    per_device_train_batch_size: int = _opt(4, "micro-batch size per process")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    num_train_epochs: float = _opt(1.0, "epochs (ignored when --max_steps > 0)")
    max_steps: int = _opt(-1, "optimizer steps (overrides --num_train_epochs when > 0)")
    learning_rate: float = _opt(2e-5, "learning rate of the final block, final norm and LM head (all of E2E)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not applied to biases and norms)")
    warmup_ratio: float = _opt(0.0, "fraction of steps of linear warm-up")
    lr_scheduler_type: str = _opt("linear", "transformers scheduler name: linear, cosine, constant, ...")
    max_grad_norm: float = _opt(1.0, "global gradient-norm clip over all parameters (0 disables)")
    gradient_checkpointing: bool = _opt(False, "recompute each layer in backward instead of storing its activations")
    bf16: bool | None = _opt(None, "bfloat16 weights (default: on for CUDA with bf16 support, off on CPU)")
    fp16: bool = _opt(False, "float16 autocast with loss scaling (CUDA only)")
    seed: int = _opt(42, "random seed (data order, heads, sampling)")
    # output
    output_dir: str | None = _opt(None, "where the run writes its files (required)")
    overwrite_output_dir: bool = _opt(False, "allow writing into a non-empty --output_dir")
    logging_steps: int = _opt(10, "write a metrics.jsonl line every N steps")
    save_steps: int = _opt(500, "write checkpoint-N/ every N steps (0 disables)")
    save_total_limit: int | None = _opt(None, "keep only the newest N checkpoints")
    log_level: str = _opt(
        "info",
        "what is printed: info (lopt's progress and phases, libraries quiet), warning (lopt's warnings only), "
        "debug (also every library's bars, logs and warnings); LOPT_LOG_LEVEL sets it for every command",
        choices=["debug", "info", "warning"],
    )
    tui: bool | None = _opt(
        None,
        "full-screen live dashboard of the run (default: on with LOPT_TUI=1); off, saying why, when the output is "
        "not a terminal",
    )
    report_to: str = _opt(
        "none",
        "experiment trackers, comma-separated: trackio, tensorboard, wandb (pip install 'lopt[tracking]'); none: off",
    )
    resume_from_checkpoint: str | None = _opt(
        None, "continue a run: a checkpoint-N folder, or 'latest' in --output_dir"
    )
    config: str | None = _opt(None, "YAML file with any of these flags as keys (the command line wins)")

    # which fields the user set (YAML or CLI); not a flag
    explicit: frozenset = field(default=frozenset(), repr=False, metadata={"internal": True})

    @property
    def canonical_method(self) -> str:
        return METHODS[self.method]

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}


@dataclass
class SFTConfig(RunConfig):
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = RunConfig.AT_LEAST_ONE + ("max_seq_length",)

    dataset_preset: str = _opt("gsm-symbolic", "data preset: gsm-symbolic (offline), alpaca, metamathqa, tulu3")
    max_seq_length: int = _opt(1024, "truncate examples to this many tokens")
    prompt_format: str = _opt(
        "chat",
        "chat: every record through the model's chat template; reference: the reference implementation's plain "
        "text for Alpaca records ('Instruction: {instruction}\\n[{input}\\n]Response:\\n' + output) and text "
        "prompt/completion records (prompt + completion), loss on the answer only; other record shapes still "
        "go through the chat template",
        choices=list(PROMPT_FORMATS),
    )
    liger: bool = _opt(
        False, "LM-head loss with Liger Kernel's fused linear cross entropy (CUDA; pip install liger-kernel)"
    )


@dataclass
class GRPOConfig(RunConfig):
    """GRPO with TRL's GRPOTrainer; the sampling and loss flags are TRL's, passed through."""

    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = RunConfig.AT_LEAST_ONE + (
        "num_generations",
        "max_prompt_length",
        "max_completion_length",
        "num_iterations",
    )

    learning_rate: float = _opt(1e-6, "learning rate of the final block, final norm and LM head (all of E2E)")
    task: str = _opt(
        "gsm-symbolic",
        "gsm-symbolic (offline), gsm8k (openai/gsm8k), numinamath (AI-MO/NuminaMath-CoT)",
        choices=sorted(TASKS),
    )
    format_reward_weight: float = _opt(0.0, "weight of a reward for writing the answer in the task's format (0: off)")
    num_generations: int = _opt(4, "completions sampled per prompt (a group)")
    max_prompt_length: int = _opt(512, "prompts longer than this many tokens are skipped")
    max_completion_length: int = _opt(256, "tokens generated per completion at most")
    temperature: float = _opt(1.0, "sampling temperature")
    top_p: float = _opt(1.0, "nucleus sampling probability")
    beta: float = _opt(0.0, "KL coefficient against the frozen starting model (0: no reference model)")
    loss_type: str = _opt("dapo", "TRL's GRPO loss: grpo, dapo, dr_grpo, bnpo, ... (passed through)")
    num_iterations: int = _opt(1, "optimization passes over each generated batch (mu)")
    steps_per_generation: int | None = _opt(
        None, "micro-batches per generation (default: --gradient_accumulation_steps)"
    )
    use_vllm: bool = _opt(False, "generate with vLLM (needs vllm installed and a GPU)")


def _reference_default(cls, name: str, value):
    """Field ``name`` of ``cls`` with the reference implementation's default; its help and choices are kept."""
    return field(default=value, metadata=cls.__dataclass_fields__[name].metadata)


@dataclass
class ReferenceSFTConfig(SFTConfig):
    """`train_sft.py`: `lopt sft` with the LoPT reference implementation's defaults where lopt's differ."""

    lr_scheduler_type: str = _reference_default(SFTConfig, "lr_scheduler_type", "cosine")
    warmup_ratio: float = _reference_default(SFTConfig, "warmup_ratio", 0.03)
    select_samples: str = _reference_default(SFTConfig, "select_samples", "random")
    prompt_format: str = _reference_default(SFTConfig, "prompt_format", "reference")


@dataclass
class ReferenceGRPOConfig(GRPOConfig):
    """`train_grpo.py`: `lopt grpo` with the LoPT reference implementation's defaults where lopt's differ."""

    lr_scheduler_type: str = _reference_default(GRPOConfig, "lr_scheduler_type", "cosine")
    warmup_ratio: float = _reference_default(GRPOConfig, "warmup_ratio", 0.03)
    select_samples: str = _reference_default(GRPOConfig, "select_samples", "random")


@dataclass
class DPOConfig(RunConfig):
    """DPO with TRL's DPOTrainer; the reference model is the frozen starting model."""

    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = RunConfig.AT_LEAST_ONE + ("max_seq_length",)

    learning_rate: float = _opt(1e-6, "learning rate of the final block, final norm and LM head (all of E2E)")
    dataset_preset: str = _opt("gsm-symbolic-pairs", "preference preset: gsm-symbolic-pairs (synthetic, offline)")
    max_seq_length: int = _opt(1024, "truncate prompt + answer to this many tokens")
    beta: float = _opt(0.1, "DPO temperature: how far the policy may move from the reference model")
    loss_type: str = _opt("sigmoid", "TRL's DPO loss: sigmoid, ipo, hinge, ... (passed through)")


def _flag_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _value_type(f: dataclasses.Field):
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


def build_parser(cls=SFTConfig, prog: str = "lopt sft", description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field; unset flags stay absent (not defaulted)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False
    )
    for f in _flag_fields(cls):
        kind = _value_type(f)
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, choices=f.metadata.get("choices"), help=help_text)
    return parser


def _read_yaml(path: str, cls) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise LoptError(f"--config {path}: no such file. Pass the path of a YAML file whose keys are flag names.")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise LoptError(
            f"{where}: malformed YAML ({getattr(exc, 'problem', exc)}). Fix the file or remove --config."
        ) from exc
    if not isinstance(data, dict):
        raise LoptError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}.")
    names = [f.name for f in _flag_fields(cls)]
    for key in data:
        if key not in names or key == "config":
            raise LoptError(
                f"{path}: unknown key {key!r}.{did_you_mean(key, names)} Valid keys are the flags of `{cls.__name__}` "
                "(see `lopt sft --help`)."
            )
    return data


def _coerce(cls, name: str, value: Any, source: str) -> Any:
    f = next(f for f in _flag_fields(cls) if f.name == name)
    kind = _value_type(f)
    if value is None:
        return None
    if kind is bool and not isinstance(value, bool):
        raise LoptError(f"{source}: {name} must be true or false, got {value!r}.")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise LoptError(f"{source}: {name} must be a number, got {value!r}.")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise LoptError(f"{source}: {name} must be an integer, got {value!r}.")
    return kind(value)


def parse_config(argv: list[str] | None, cls=SFTConfig, prog: str = "lopt sft", description: str = ""):
    """Parse flags (and the YAML named by --config) into a validated config of type `cls`."""
    parser = build_parser(cls, prog, description)
    cli, unknown = parser.parse_known_args(argv)
    if unknown:
        names = [f"--{f.name}" for f in _flag_fields(cls)]
        flag = unknown[0].split("=")[0]
        parser.error(f"unrecognized argument {unknown[0]!r}.{did_you_mean(flag, names)}")
    cli = vars(cli)
    values: dict[str, Any] = {}
    if "config" in cli:
        for key, value in _read_yaml(cli["config"], cls).items():
            values[key] = _coerce(cls, key, value, cli["config"])
    values.update(cli)
    config = cls(**values, explicit=frozenset(values))
    validate(config)
    return config


def validate(config) -> None:
    """Checks that need no model or data; each error names the flag and the fix."""
    if config.method not in METHODS:
        raise unknown_choice("--method", config.method, sorted(METHODS))
    for f in _flag_fields(type(config)):  # argparse checks flags; this checks YAML values too
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise unknown_choice(f"--{f.name}", getattr(config, f.name), choices)
    from transformers import SchedulerType  # here: importing transformers takes seconds, --help needs none of it

    schedules = [kind.value for kind in SchedulerType]
    if config.lr_scheduler_type not in schedules:
        raise unknown_choice("--lr_scheduler_type", config.lr_scheduler_type, schedules)
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise LoptError(
            f"--num_train_epochs {config.num_train_epochs} trains nothing; pass a number above 0, or --max_steps N."
        )
    if config.canonical_method == "e2e":
        for name in ("num_blocks", "lr_k1", "backward", "early_blocks"):
            if name in config.explicit:
                raise LoptError(f"--{name} applies to --method lopt only; drop it or use --method lopt.")
    elif config.num_blocks < 2:
        raise LoptError(
            f"--num_blocks {config.num_blocks}: LoPT needs at least 2 blocks. Use --num_blocks 2 (the paper's default) "
            "or --method e2e for end-to-end training."
        )
    if config.bf16 and config.fp16:
        raise LoptError("--bf16 and --fp16 are exclusive; pass one (bf16 where the GPU supports it).")
    for name in config.AT_LEAST_ONE:
        if getattr(config, name) < 1:
            raise LoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.learning_rate <= 0 or (config.lr_k1 is not None and config.lr_k1 < 0):
        raise LoptError("--learning_rate must be > 0 and --lr_k1 >= 0.")
    if config.save_total_limit is not None and config.save_total_limit < 1:
        raise LoptError(f"--save_total_limit must be at least 1, got {config.save_total_limit}.")
    if config.max_samples is not None and config.max_samples < 1:
        raise LoptError(f"--max_samples must be at least 1, got {config.max_samples}.")
    parse_report_to(config.report_to)  # named and installed, before anything loads
    if not config.output_dir:
        raise LoptError("--output_dir is required: the folder where the run writes its model, metrics and checkpoints.")


def save_config(config, path: Path) -> None:
    path.write_text(json.dumps(config.to_json(), indent=2) + "\n")
