"""Typed run configs: flags and YAML keys come from one dataclass, merged as defaults < YAML < CLI.

Every field of `SFTConfig` is a command-line flag (`--name`) and a YAML key (`name:`). Each value
remembers whether the user set it, so validation can tell a default from a choice (for example
`--method e2e` with an explicit `--num_blocks` is a conflict, the default is not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from lopt.data.formats import PROMPT_FORMATS
from lopt.data.sources import SELECT_SAMPLES
from lopt.errors import LoptError, did_you_mean, unknown_choice
from lopt.tasks import TASKS
from lopt.training.optim import OPTIMIZERS
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
        "per_device_eval_batch_size",
    )
    # --metric_for_best_model: the metrics.jsonl columns a recipe accepts, each with whether greater is better
    BEST_MODEL_METRICS: ClassVar[dict[str, bool]] = {"eval_task_loss": False}

    # model
    model_name_or_path: str = _opt("smollm2-135m", "alias (smollm2-135m, qwen3-4b, ...), local folder or hub id")
    trust_remote_code: bool = _opt(
        False,
        "run the Python code the model's repository ships (custom architectures); only for repositories you trust",
    )
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
    aux_loss: str = _opt(
        "recon",
        "LoPT: local objective of the non-final blocks: recon (the paper's: mean squared error between the head's "
        "reconstruction and the block's input) or recon_normalized (that error divided by each token's variance of "
        "the block's input over the hidden dimension, so every block's loss is on one scale, about 1, whatever the "
        "residual stream's magnitude at its depth)",
        choices=["recon", "recon_normalized"],
    )
    lambda_aux: float = _opt(10.0, "LoPT: weight of the mean local loss in the objective")
    lr_k1: float | None = _opt(
        None, "LoPT: learning rate of embeddings, early blocks and heads (default: --learning_rate)"
    )
    clip_per_block: bool = _opt(
        False,
        "LoPT: --max_grad_norm clips each block's gradients (embeddings with block 1, each head with its block, final "
        "norm and LM head with the final block) by that block's own norm instead of all by the global norm, so one "
        "block's large local gradient cannot shrink the final block's task gradient (`lopt sft --block_step` "
        "always does)",
    )
    backward: str = _opt(
        "local",
        "LoPT: local (block by block, frees activations) or joint (one backward, as the reference)",
        choices=["local", "joint"],
    )
    # adapters (LoRA / QLoRA, through peft; models/lora.py)
    use_peft: bool = _opt(
        False,
        "train LoRA adapters instead of the weights (base model frozen, embeddings and LM head included); with "
        "--method lopt every block's adapters learn from that block's objective",
    )
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the adapters' input")
    lora_target_modules: str = _opt(
        "all-linear",
        "modules that get adapters: all-linear (every linear layer of attention and MLP, not the LM head) or "
        "comma-separated names, e.g. q_proj,v_proj",
    )
    load_in_4bit: bool = _opt(False, "QLoRA: load the frozen base in 4-bit NF4 with bitsandbytes (CUDA only)")
    load_in_8bit: bool = _opt(False, "load the frozen base in 8-bit with bitsandbytes (CUDA only)")
    merge_lora: bool = _opt(
        False, "save the final model with the adapters merged in (a plain checkpoint) instead of the adapter folder"
    )
    # data
    dataset_name: str | None = _opt(None, "hub dataset id (overrides --dataset_preset / --task's own data)")
    dataset_config: str | None = _opt(None, "hub dataset config name")
    train_file: str | None = _opt(
        None,
        "local .json / .jsonl / .parquet / .csv file, or a folder saved with datasets' save_to_disk (overrides "
        "--dataset_name and the preset)",
    )
    split: str = _opt("train", "dataset split")
    max_samples: int | None = _opt(None, "keep N records, picked as --select_samples says")
    select_samples: str = _opt(
        "first",
        "how --max_samples picks records: first (the first N) or random (N drawn after a shuffle seeded by "
        "--seed); the generated gsm-symbolic data is exactly N random problems from --seed either way",
        choices=list(SELECT_SAMPLES),
    )
    # validation (the held-out records: at most one of --eval_file, --eval_split, --eval_ratio)
    eval_file: str | None = _opt(
        None, "validate on the records of this file or saved dataset folder (the formats of --train_file)"
    )
    eval_split: str | None = _opt(
        None, "validate on this split (validation, test, ...) of the training data's hub dataset or saved DatasetDict"
    )
    eval_ratio: float | None = _opt(
        None, "validate on this fraction of the training records, held out before training (drawn with --seed)"
    )
    eval_steps: int | None = _opt(None, "validate every N steps and after the last one (default: --logging_steps)")
    per_device_eval_batch_size: int = _opt(8, "validation batch size per process")
    load_best_model_at_end: bool = _opt(
        False, "save the weights of the best validation as the final model, not the last ones (--metric_for_best_model)"
    )
    metric_for_best_model: str = _opt(
        "eval_task_loss", "validation metric that decides the best model: eval_task_loss (lower is better)"
    )
    early_stopping_patience: int | None = _opt(
        None, "stop when --metric_for_best_model has not improved for N validations in a row"
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
    optim: str = _opt(
        "adamw_torch",
        "optimizer (transformers' names): " + "; ".join(f"{name}: {what}" for name, what in OPTIMIZERS.items()),
        choices=list(OPTIMIZERS),
    )
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
    # publishing (tools/publish.py)
    push_to_hub: bool = _opt(
        False,
        "upload the final model folder, with lopt's model card, to the Hugging Face hub when the run succeeds; needs "
        "--hub_model_id",
    )
    hub_model_id: str | None = _opt(None, "hub repository to create or update: ORG/NAME, or NAME under your account")
    hub_private_repo: bool = _opt(
        False,
        "create the repository private (default: the hub's default, public unless the organization says otherwise; "
        "an existing repository keeps its visibility)",
    )
    hub_token: str | None = _opt(
        None,
        "token with write access (default: HF_TOKEN, else the one `hf auth login` saved); never written to the run's "
        "files",
        secret=True,
    )
    config: str | None = _opt(None, "YAML file with any of these flags as keys (the command line wins)")

    # which fields the user set (YAML or CLI); not a flag
    explicit: frozenset = field(default=frozenset(), repr=False, metadata={"internal": True})

    @property
    def canonical_method(self) -> str:
        return METHODS[self.method]

    def to_json(self) -> dict[str, Any]:
        """The flags' values, as training_args.json and the trackers record them; secrets (the hub token) left out."""
        kept = [f for f in dataclasses.fields(self) if not (f.metadata.get("internal") or f.metadata.get("secret"))]
        return {f.name: getattr(self, f.name) for f in kept}


@dataclass
class SFTConfig(RunConfig):
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = RunConfig.AT_LEAST_ONE + ("max_seq_length",)

    dataset_preset: str = _opt(
        "gsm-symbolic", "data preset: gsm-symbolic, aiw, chain-sum (offline), alpaca, metamathqa, tulu3 (hub)"
    )
    max_seq_length: int = _opt(1024, "truncate examples to this many tokens")
    prompt_format: str = _opt(
        "chat",
        "chat: every record through the model's chat template; reference: the reference implementation's plain "
        "text for Alpaca records ('Instruction: {instruction}\\n[{input}\\n]Response:\\n' + output) and text "
        "prompt/completion records (prompt + completion), loss on the answer only; other record shapes still "
        "go through the chat template",
        choices=list(PROMPT_FORMATS),
    )
    block_step: bool = _opt(
        False,
        "LoPT: step each block's parameters right after that block's backward and free its gradients, so at most "
        "one block's gradients are alive (needs --backward local, --gradient_accumulation_steps 1); --max_grad_norm "
        "then clips each block by its own gradient norm, not by the global norm (as --clip_per_block)",
    )
    packing: bool = _opt(
        False,
        "pack whole examples into sequences of up to --max_seq_length tokens (best-fit decreasing: little padding, "
        "each example attends only to itself); a batch is then --per_device_train_batch_size packed "
        "sequences",
    )
    liger: bool = _opt(
        False, "LM-head loss with Liger Kernel's fused linear cross entropy (CUDA; pip install liger-kernel)"
    )
    kl_beta: float = _opt(
        0.0,
        "add kl_beta x KL(model || starting model) per trained token to the task loss (0: off); the starting model "
        "is a frozen second copy of the weights, or with --use_peft the base with the adapters disabled",
    )


@dataclass
class PolicyRLConfig(RunConfig):
    """RL on completions sampled from the policy, a group per prompt (TRL's GRPOTrainer and RLOOTrainer): the
    prompts, the rewards (verifiable, your functions, a reward model) and the sampling flags they share."""

    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = RunConfig.AT_LEAST_ONE + (
        "num_generations",
        "max_prompt_length",
        "max_completion_length",
        "num_iterations",
    )

    BEST_MODEL_METRICS: ClassVar[dict[str, bool]] = {"eval_reward": True, "eval_task_loss": False}

    learning_rate: float = _opt(1e-6, "learning rate of the final block, final norm and LM head (all of E2E)")
    metric_for_best_model: str = _opt(
        "eval_reward",
        "validation metric that decides the best model: eval_reward (mean total reward of the completions sampled "
        "for the validation prompts, higher is better) or eval_task_loss (TRL's loss on them, lower is better)",
    )
    task: str = _opt(
        "gsm-symbolic",
        "gsm-symbolic, aiw, chain-sum (offline), gsm8k (openai/gsm8k), numinamath (AI-MO/NuminaMath-CoT)",
        choices=sorted(TASKS),
    )
    format_reward_weight: float = _opt(0.0, "weight of a reward for writing the answer in the task's format (0: off)")
    reward_funcs: str | None = _opt(
        None,
        "your own reward functions beside the task's, comma-separated: MODULE:FUNCTION (importable: installed or on "
        "PYTHONPATH) or PATH.py:FUNCTION; each def f(prompts, completions, **kwargs) -> list[float], the data's "
        "columns (answer, ...) in kwargs",
    )
    reward_model: str | None = _opt(
        None,
        "a reward model folder (`lopt rm` output, or any transformers sequence classifier with one label): its score "
        "of prompt + completion is a reward beside the others",
    )
    reward_weights: str | None = _opt(
        None,
        "comma-separated weights: the task's correctness reward's, then each --reward_funcs function's in order, then "
        "--reward_model's (default: 1 each; 0 logs a reward without training on it; the format reward's weight is "
        "--format_reward_weight)",
    )
    num_generations: int = _opt(4, "completions sampled per prompt (a group)")
    max_prompt_length: int = _opt(512, "prompts longer than this many tokens are skipped")
    max_completion_length: int = _opt(256, "tokens generated per completion at most")
    temperature: float = _opt(1.0, "sampling temperature")
    top_p: float = _opt(1.0, "nucleus sampling probability")
    beta: float = _opt(0.0, "KL coefficient against the frozen starting model (0: no reference model)")
    num_iterations: int = _opt(1, "optimization passes over each generated batch (mu)")
    steps_per_generation: int | None = _opt(
        None, "micro-batches per generation (default: --gradient_accumulation_steps)"
    )
    use_vllm: bool = _opt(False, "generate with vLLM (needs vllm installed and a GPU)")


@dataclass
class GRPOConfig(PolicyRLConfig):
    """GRPO with TRL's GRPOTrainer; the sampling and loss flags are TRL's, passed through."""

    loss_type: str = _opt("dapo", "TRL's GRPO loss: grpo, dapo, dr_grpo, bnpo, ... (passed through)")


@dataclass
class RLOOConfig(PolicyRLConfig):
    """RLOO with TRL's RLOOTrainer: each completion's baseline is the mean reward of the others of its prompt, and the
    KL to the starting model (--beta) is part of the reward."""

    beta: float = _opt(0.05, "KL coefficient against the frozen starting model (RLOO's default 0.05; 0: none)")
    normalize_advantages: bool = _opt(False, "scale the advantages to unit standard deviation (TRL's)")


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
class PreferenceConfig(RunConfig):
    """What the recipes trained on preference pairs share (DPO, reward models): the pair data and its validation."""

    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = RunConfig.AT_LEAST_ONE + ("max_seq_length",)
    BEST_MODEL_METRICS: ClassVar[dict[str, bool]] = {
        "eval_task_loss": False, "eval_reward_accuracy": True, "eval_reward_margin": True,
    }  # fmt: skip
    PRESETS_HELP: ClassVar[str] = (
        "gsm-symbolic-pairs, gsm-symbolic-reasoning-pairs (synthetic, offline), hh-rlhf, ultrafeedback (hub)"
    )

    dataset_preset: str = _opt("gsm-symbolic-pairs", f"preference preset: {PRESETS_HELP}")
    max_seq_length: int = _opt(1024, "truncate prompt + answer to this many tokens")


@dataclass
class DPOConfig(PreferenceConfig):
    """DPO with TRL's DPOTrainer; the reference model is the frozen starting model."""

    learning_rate: float = _opt(1e-6, "learning rate of the final block, final norm and LM head (all of E2E)")
    metric_for_best_model: str = _opt(
        "eval_task_loss",
        "validation metric that decides the best model: eval_task_loss (the DPO loss, lower is better), "
        "eval_reward_accuracy or eval_reward_margin (higher is better)",
    )
    beta: float = _opt(0.1, "DPO temperature: how far the policy may move from the reference model")
    loss_type: str = _opt("sigmoid", "TRL's DPO loss: sigmoid, ipo, hinge, ... (passed through)")


@dataclass
class RMConfig(PreferenceConfig):
    """A reward model with TRL's RewardTrainer: a one-score head on the model, Bradley-Terry loss on pairs."""

    learning_rate: float = _opt(1e-5, "learning rate of the final block, final norm and score head (all of E2E)")
    metric_for_best_model: str = _opt(
        "eval_reward_accuracy",
        "validation metric that decides the best model: eval_reward_accuracy or eval_reward_margin (higher is "
        "better), eval_task_loss (the pairwise loss, lower is better)",
    )
    dataset_preset: str = _opt("gsm-symbolic-reasoning-pairs", f"preference preset: {PreferenceConfig.PRESETS_HELP}")
    max_seq_length: int = _opt(1024, "pairs whose prompt + answer is longer than this many tokens are left out")
    center_rewards_coefficient: float | None = _opt(
        None, "weight of a penalty on the mean squared reward, which keeps rewards centred on 0 (TRL's; off: None)"
    )


def _flag_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _value_type(f: dataclasses.Field):
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


# The sections of `--help`, in order, and the flags in each (a flag named nowhere is listed under "options", with
# --help and --config). A recipe shows the sections it has flags in.
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("model_name_or_path", "trust_remote_code"),
    "data": (
        "dataset_preset", "task", "dataset_name", "dataset_config", "train_file", "split", "max_samples",
        "select_samples", "max_seq_length", "prompt_format", "packing",
    ),
    "generation": (
        "num_generations", "max_prompt_length", "max_completion_length", "temperature", "top_p",
        "steps_per_generation", "use_vllm",
    ),
    "rewards": ("reward_funcs", "reward_model", "reward_weights", "format_reward_weight"),
    "method and LoPT": (
        "method", "num_blocks", "early_blocks", "aux_loss", "lambda_aux", "lr_k1", "backward", "block_step",
        "clip_per_block",
    ),
    "LoRA / adapters": (
        "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit", "load_in_8bit",
        "merge_lora",
    ),
    "optimization": (
        "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "learning_rate",
        "weight_decay", "warmup_ratio", "lr_scheduler_type", "optim", "max_grad_norm", "gradient_checkpointing", "bf16",
        "fp16", "seed", "liger", "kl_beta", "beta", "loss_type", "num_iterations", "center_rewards_coefficient",
        "normalize_advantages",
    ),
    "validation": (
        "eval_file", "eval_split", "eval_ratio", "eval_steps", "per_device_eval_batch_size", "load_best_model_at_end",
        "metric_for_best_model", "early_stopping_patience",
    ),
    "output and logging": (
        "output_dir", "overwrite_output_dir", "logging_steps", "save_steps", "save_total_limit",
        "resume_from_checkpoint", "log_level", "tui", "report_to",
    ),
    "hub": ("push_to_hub", "hub_model_id", "hub_private_repo", "hub_token"),
}  # fmt: skip
# No flag sets up several processes: the launcher does, and this section of --help says how.
DISTRIBUTED_HELP = (
    "no flags: run the same command under `torchrun --nproc_per_node N -m lopt.cli <command> ...` (data parallel) "
    "or `accelerate launch --config_file configs/accelerate_<setup>.yaml -m lopt.cli <command> ...` (multi-GPU, "
    "multi-node, FSDP2, DeepSpeed ZeRO); the launch's settings pick the backend."
)


def build_parser(cls=SFTConfig, prog: str = "lopt sft", description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field, in the sections of FLAG_GROUPS; unset flags stay absent
    (not defaulted)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False
    )
    fields = _flag_fields(cls)
    names = {f.name for f in fields}
    groups = {}
    for title, members in FLAG_GROUPS.items():
        if names & set(members):
            group = parser.add_argument_group(title)
            groups.update(dict.fromkeys(members, group))
    parser.add_argument_group("distributed", DISTRIBUTED_HELP)
    listed = [name for members in FLAG_GROUPS.values() for name in members]
    for f in sorted(fields, key=lambda f: listed.index(f.name) if f.name in listed else -1):  # as FLAG_GROUPS lists
        kind = _value_type(f)
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # a help that explains its default says it once
            help_text += f" (default: {f.default})"
        section = groups.get(f.name, parser)
        if kind is bool:
            section.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            section.add_argument(f"--{f.name}", type=kind, choices=f.metadata.get("choices"), help=help_text)
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
        for name in ("num_blocks", "lr_k1", "backward", "early_blocks", "aux_loss"):
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
    _validate_adapters(config)
    _validate_validation(config)
    if getattr(config, "block_step", False):
        _validate_block_step(config)
    if getattr(config, "clip_per_block", False):
        _validate_clip_per_block(config)
    if getattr(config, "kl_beta", 0.0) < 0:
        raise LoptError(f"--kl_beta must be >= 0 (0 turns the KL term off), got {config.kl_beta}.")
    if getattr(config, "kl_beta", 0.0) > 0 and config.liger:
        raise LoptError("--kl_beta computes the LM head chunk by chunk itself; drop --liger to use it.")
    if isinstance(config, PolicyRLConfig):
        _validate_grpo(config)
    parse_report_to(config.report_to)  # named and installed, before anything loads
    from lopt.tools.publish import check_push_flags  # here: it imports huggingface_hub

    check_push_flags(config)  # the repository id, offline mode and a token, before hours of training
    if not config.output_dir:
        raise LoptError("--output_dir is required: the folder where the run writes its model, metrics and checkpoints.")


ADAPTER_FLAGS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "load_in_4bit",
    "load_in_8bit",
    "merge_lora",
)


def _validate_adapters(config) -> None:
    if not config.use_peft:
        given = [f"--{name}" for name in ADAPTER_FLAGS if name in config.explicit and getattr(config, name)]
        if given:
            raise LoptError(f"{', '.join(given)} configure LoRA adapters; add --use_peft, or drop them.")
        return
    from lopt.models.lora import target_modules

    if config.lora_r < 1 or config.lora_alpha <= 0:
        raise LoptError(
            f"--lora_r must be at least 1 and --lora_alpha above 0, got {config.lora_r} and {config.lora_alpha}."
        )
    if not 0 <= config.lora_dropout < 1:
        raise LoptError(f"--lora_dropout must be in [0, 1), got {config.lora_dropout}.")
    if config.load_in_4bit and config.load_in_8bit:
        raise LoptError("--load_in_4bit and --load_in_8bit are exclusive; pass one.")
    target_modules(config.lora_target_modules)


EVAL_SOURCES = ("eval_file", "eval_split", "eval_ratio")
EVAL_OPTIONS = (
    "eval_steps",
    "per_device_eval_batch_size",
    "load_best_model_at_end",
    "metric_for_best_model",
    "early_stopping_patience",
)


def _validate_block_step(config) -> None:
    if config.canonical_method == "e2e":
        raise LoptError(
            "--block_step needs --method lopt (2 or more blocks): end-to-end training has one block, whose step is "
            "the whole step."
        )
    if config.backward != "local":
        raise LoptError(
            "--block_step needs --backward local: joint backward computes every block's gradients at the end of the "
            "step, so no block could step earlier."
        )
    if config.gradient_accumulation_steps != 1:
        raise LoptError(
            "--block_step needs --gradient_accumulation_steps 1: a block's gradients are final only after the last "
            "micro-batch; raise --per_device_train_batch_size instead."
        )
    if config.fp16:
        raise LoptError(
            "--block_step with --fp16: the loss scaler unscales and skips whole steps, not blocks; use --bf16 or "
            "float32."
        )


def _validate_clip_per_block(config) -> None:
    if config.canonical_method == "e2e":
        raise LoptError(
            "--clip_per_block needs --method lopt (2 or more blocks): end-to-end training has one block, whose norm "
            "is the global norm; drop --clip_per_block."
        )
    if config.max_grad_norm <= 0:
        raise LoptError(
            f"--clip_per_block clips each block to --max_grad_norm, which is {config.max_grad_norm} (clipping off); "
            "pass --max_grad_norm above 0, or drop --clip_per_block."
        )


def validates(config) -> bool:
    """Whether the run has validation records (--eval_file, --eval_split or --eval_ratio)."""
    return any(getattr(config, name) is not None for name in EVAL_SOURCES)


def eval_steps(config) -> int:
    """Steps between validations: --eval_steps, else --logging_steps (as transformers' TrainingArguments)."""
    return config.eval_steps if config.eval_steps is not None else config.logging_steps


def _validate_validation(config) -> None:
    sources = [f"--{name}" for name in EVAL_SOURCES if getattr(config, name) is not None]
    if len(sources) > 1:
        raise LoptError(
            f"{' and '.join(sources)} each name the validation records; pass only one of --eval_file, --eval_split "
            "and --eval_ratio."
        )
    if not sources:
        given = [f"--{name}" for name in EVAL_OPTIONS if name in config.explicit and getattr(config, name)]
        if given:
            raise LoptError(
                f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} validation records; add --eval_file "
                "FILE, --eval_split NAME or --eval_ratio R (a held-out fraction of the training records), or drop "
                f"{'it' if len(given) == 1 else 'them'}."
            )
        return
    if config.eval_ratio is not None and not 0 < config.eval_ratio < 1:
        raise LoptError(
            f"--eval_ratio is the fraction of the training records held out for validation: pass a number between 0 "
            f"and 1 (e.g. 0.05), got {config.eval_ratio}."
        )
    for name in ("eval_steps", "early_stopping_patience"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise LoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    metrics = config.BEST_MODEL_METRICS
    if config.metric_for_best_model not in metrics:
        raise unknown_choice(
            "--metric_for_best_model",
            config.metric_for_best_model,
            {name: "higher is better" if greater else "lower is better" for name, greater in metrics.items()},
        )
    if config.load_best_model_at_end and not isinstance(config, SFTConfig):
        # TRL's Trainer (transformers) restores the best of the checkpoints it saved at validation steps only.
        every = eval_steps(config)
        if config.save_steps == 0 or config.save_steps % every:
            raise LoptError(
                f"--load_best_model_at_end restores the best checkpoint, so checkpoints must be saved at validation "
                f"steps: --save_steps {config.save_steps} is not a multiple of --eval_steps {every}. Pass --save_steps "
                f"{max(config.save_steps // every, 1) * every}, or an --eval_steps that divides --save_steps."
            )


def _validate_grpo(config: PolicyRLConfig) -> None:
    if config.num_generations < 2:
        raise LoptError(
            "--num_generations must be at least 2 (GRPO and RLOO compare the completions of each prompt with each "
            f"other), got {config.num_generations}."
        )
    if config.steps_per_generation is not None and config.steps_per_generation < 1:
        raise LoptError(f"--steps_per_generation must be at least 1, got {config.steps_per_generation}.")
    # TRL samples per_device_train_batch_size x steps_per_generation x processes completions at a time (its
    # generation_batch_size, which lopt sets through these flags) and needs whole groups of num_generations in it;
    # checked here, so that the error names the flags the user has.
    steps_flag = "steps_per_generation" if config.steps_per_generation is not None else "gradient_accumulation_steps"
    batch, steps, groups = config.per_device_train_batch_size, getattr(config, steps_flag), config.num_generations
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    total = batch * steps * processes
    if total % groups:
        batch_unit = groups // math.gcd(groups, steps * processes)  # the batch sizes that work are its multiples
        smaller = batch // batch_unit * batch_unit
        batches = f"{smaller} or {smaller + batch_unit}" if smaller else f"{batch_unit}"
        steps_unit = groups // math.gcd(groups, batch * processes)
        divisors = [n for n in range(2, total + 1) if total % n == 0]
        closest = sorted(divisors, key=lambda n: abs(n - groups))[:2]
        generations = f", or --num_generations {' or '.join(map(str, sorted(closest)))}" if closest else ""
        raise LoptError(
            f"--num_generations {groups} does not divide the {total} completions sampled at a time "
            f"(--per_device_train_batch_size {batch} x --{steps_flag} {steps} x {processes} "
            f"process{'es' if processes > 1 else ''}); each prompt's {groups} completions must be sampled together. "
            f"Use --per_device_train_batch_size {batches}, --{steps_flag} {-(-steps // steps_unit) * steps_unit}"
            f"{generations}."
        )
    if validates(config) and config.per_device_eval_batch_size * processes % groups:
        # TRL samples num_generations completions for each validation prompt too, within one validation batch
        unit = groups // math.gcd(groups, processes)
        raise LoptError(
            f"--num_generations {groups} does not divide the {config.per_device_eval_batch_size * processes} "
            f"completions validated at a time (--per_device_eval_batch_size {config.per_device_eval_batch_size} x "
            f"{processes} process{'es' if processes > 1 else ''}); use --per_device_eval_batch_size "
            f"{-(-config.per_device_eval_batch_size // unit) * unit}."
        )
    from lopt.tasks import grpo_rewards  # here: it imports the user's reward modules

    grpo_rewards(config)  # --reward_funcs importable and --reward_weights one per function, before anything loads


def save_config(config, path: Path) -> None:
    path.write_text(json.dumps(config.to_json(), indent=2) + "\n")
