"""The run configs' schema: every flag of every recipe, as fields of one dataclass per recipe.

Every field of a config is a command-line flag (`--name`) and a YAML key (`name:`); parse.py reads them, merged as
defaults < YAML < CLI. Each value remembers whether the user set it (`explicit`), so validation can tell a default
from a choice (for example `--method e2e` with an explicit `--num_blocks` is a conflict, the default is not).

`RunConfig` holds the flags every recipe shares. The LoPT, adapter and validation flags are declared beside their
checks (method.py, adapters.py, validation.py) and mixed in; this module declares the rest and `FLAG_GROUPS`, the
sections of `--help`. The order of the fields is the order of training_args.json's keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lopt.config.adapters import AdapterFlags
from lopt.config.fields import option, reference_default
from lopt.config.method import MethodFlags
from lopt.config.optimizers import OPTIMIZERS
from lopt.config.validation import ValidationFlags
from lopt.data.formats import PROMPT_FORMATS
from lopt.data.sources import SELECT_SAMPLES


@dataclass
class ModelFlags:
    model_name_or_path: str = option("smollm2-135m", "alias (smollm2-135m, qwen3-4b, ...), local folder or hub id")
    trust_remote_code: bool = option(
        False,
        "run the Python code the model's repository ships (custom architectures); only for repositories you trust",
    )


@dataclass
class DataFlags:
    dataset_name: str | None = option(None, "hub dataset id (overrides --dataset_preset / --task's own data)")
    dataset_config: str | None = option(None, "hub dataset config name")
    train_file: str | None = option(
        None,
        "local .json / .jsonl / .parquet / .csv file, or a folder saved with datasets' save_to_disk (overrides "
        "--dataset_name and the preset)",
    )
    split: str = option("train", "dataset split")
    max_samples: int | None = option(None, "keep N records, picked as --select_samples says")
    select_samples: str = option(
        "first",
        "how --max_samples picks records: first (the first N) or random (N drawn after a shuffle seeded by "
        "--seed); the generated gsm-symbolic data is exactly N random problems from --seed either way",
        choices=list(SELECT_SAMPLES),
    )


# A dataclass takes its bases' fields last base first: the bases are listed in the reverse of the flags' order
# (model, method and LoPT, adapters, data, validation), then come RunConfig's own.
@dataclass
class RunConfig(ValidationFlags, DataFlags, AdapterFlags, MethodFlags, ModelFlags):
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
    # --load_best_model_at_end restores one of the checkpoints saved at validation steps (TRL's Trainer); the SFT
    # loop keeps the best weights itself
    BEST_FROM_CHECKPOINTS: ClassVar[bool] = True

    # optimization
    per_device_train_batch_size: int = option(4, "micro-batch size per process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    num_train_epochs: float = option(1.0, "epochs (ignored when --max_steps > 0)")
    max_steps: int = option(-1, "optimizer steps (overrides --num_train_epochs when > 0)")
    learning_rate: float = option(2e-5, "learning rate of the final block, final norm and LM head (all of E2E)")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms)")
    warmup_ratio: float = option(0.0, "fraction of steps of linear warm-up")
    lr_scheduler_type: str = option("linear", "transformers scheduler name: linear, cosine, constant, ...")
    optim: str = option(
        "adamw_torch",
        "optimizer (transformers' names): " + "; ".join(f"{name}: {what}" for name, what in OPTIMIZERS.items()),
        choices=list(OPTIMIZERS),
    )
    max_grad_norm: float = option(1.0, "global gradient-norm clip over all parameters (0 disables)")
    gradient_checkpointing: bool = option(False, "recompute each layer in backward instead of storing its activations")
    bf16: bool | None = option(None, "bfloat16 weights (default: on for CUDA with bf16 support, off on CPU)")
    fp16: bool = option(False, "float16 autocast with loss scaling (CUDA only)")
    seed: int = option(42, "random seed (data order, heads, sampling)")
    # output
    output_dir: str | None = option(None, "where the run writes its files (required)")
    overwrite_output_dir: bool = option(False, "allow writing into a non-empty --output_dir")
    logging_steps: int = option(10, "write a metrics.jsonl line every N steps")
    save_steps: int = option(500, "write checkpoint-N/ every N steps (0 disables)")
    save_total_limit: int | None = option(None, "keep only the newest N checkpoints")
    log_level: str = option(
        "info",
        "what is printed: info (lopt's progress and phases, libraries quiet), warning (lopt's warnings only), "
        "debug (also every library's bars, logs and warnings); LOPT_LOG_LEVEL sets it for every command",
        choices=["debug", "info", "warning"],
    )
    tui: bool | None = option(
        None,
        "full-screen live dashboard of the run (default: on with LOPT_TUI=1); off, saying why, when the output is "
        "not a terminal",
    )
    report_to: str = option(
        "none",
        "experiment trackers, comma-separated: trackio, tensorboard, wandb (pip install 'lopt[tracking]'); none: off",
    )
    resume_from_checkpoint: str | None = option(
        None, "continue a run: a checkpoint-N folder, or 'latest' in --output_dir"
    )
    # publishing (tools/publish.py)
    push_to_hub: bool = option(
        False,
        "upload the final model folder, with lopt's model card, to the Hugging Face hub when the run succeeds; needs "
        "--hub_model_id",
    )
    hub_model_id: str | None = option(None, "hub repository to create or update: ORG/NAME, or NAME under your account")
    hub_private_repo: bool = option(
        False,
        "create the repository private (default: the hub's default, public unless the organization says otherwise; "
        "an existing repository keeps its visibility)",
    )
    hub_token: str | None = option(
        None,
        "token with write access (default: HF_TOKEN, else the one `hf auth login` saved); never written to the run's "
        "files",
        secret=True,
    )
    config: str | None = option(None, "YAML file with any of these flags as keys (the command line wins)")

    # which fields the user set (YAML or CLI); not a flag
    explicit: frozenset = field(default=frozenset(), repr=False, metadata={"internal": True})

    def check_own_flags(self) -> None:
        """The checks of the flags a recipe's config adds (none here): `validate` calls it after the shared ones."""

    def to_json(self) -> dict[str, Any]:
        """The flags' values, as training_args.json and the trackers record them; secrets (the hub token) left out."""
        kept = [f for f in dataclasses.fields(self) if not (f.metadata.get("internal") or f.metadata.get("secret"))]
        return {f.name: getattr(self, f.name) for f in kept}


@dataclass
class SFTConfig(RunConfig):
    BEST_FROM_CHECKPOINTS: ClassVar[bool] = False
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = RunConfig.AT_LEAST_ONE + ("max_seq_length",)

    dataset_preset: str = option(
        "gsm-symbolic", "data preset: gsm-symbolic, aiw, chain-sum (offline), alpaca, metamathqa, tulu3 (hub)"
    )
    max_seq_length: int = option(1024, "truncate examples to this many tokens")
    prompt_format: str = option(
        "chat",
        "chat: every record through the model's chat template; reference: the reference implementation's plain "
        "text for Alpaca records ('Instruction: {instruction}\\n[{input}\\n]Response:\\n' + output) and text "
        "prompt/completion records (prompt + completion), loss on the answer only; other record shapes still "
        "go through the chat template",
        choices=list(PROMPT_FORMATS),
    )
    block_step: bool = option(
        False,
        "LoPT: step each block's parameters right after that block's backward and free its gradients, so at most "
        "one block's gradients are alive (needs --backward local, --gradient_accumulation_steps 1); --max_grad_norm "
        "then clips each block by its own gradient norm, not by the global norm (as --clip_per_block)",
    )
    packing: bool = option(
        False,
        "pack whole examples into sequences of up to --max_seq_length tokens (best-fit decreasing: little padding, "
        "each example attends only to itself); a batch is then --per_device_train_batch_size packed "
        "sequences",
    )
    liger: bool = option(
        False, "LM-head loss with Liger Kernel's fused linear cross entropy (CUDA; pip install liger-kernel)"
    )
    kl_beta: float = option(
        0.0,
        "add kl_beta x KL(model || starting model) per trained token to the task loss (0: off); the starting model "
        "is a frozen second copy of the weights, or with --use_peft the base with the adapters disabled",
    )


@dataclass
class ReferenceSFTConfig(SFTConfig):
    """`train_sft.py`: `lopt sft` with the LoPT reference implementation's defaults where lopt's differ."""

    lr_scheduler_type: str = reference_default(SFTConfig, "lr_scheduler_type", "cosine")
    warmup_ratio: float = reference_default(SFTConfig, "warmup_ratio", 0.03)
    select_samples: str = reference_default(SFTConfig, "select_samples", "random")
    prompt_format: str = reference_default(SFTConfig, "prompt_format", "reference")


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
