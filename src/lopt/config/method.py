"""`--method` and LoPT's flags (k blocks, the local objective, backward, the early blocks' learning rate, clipping
per block), their checks, and the one object they become: `lopt_settings`, which the wrapper, the step, the
optimizer, the TRL mixin and the backends receive whole (None for --method e2e)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lopt.config.fields import option
from lopt.errors import LoptError
from lopt.runs import METHODS  # as training_args.json records them

if TYPE_CHECKING:
    from lopt.models.local_learning import LoptSettings

# The flags that configure LoPT, refused with --method e2e when the user sets them.
LOPT_ONLY = ("num_blocks", "lr_k1", "backward", "early_blocks", "aux_loss")


@dataclass
class MethodFlags:
    method: str = option(
        "lopt", "lopt (alias ll): local learning in k blocks; e2e: the end-to-end baseline", choices=sorted(METHODS)
    )
    num_blocks: int = option(2, "LoPT: number of contiguous blocks k (2 .. number of layers)")
    early_blocks: str = option(
        "recon",
        "LoPT: recon (local reconstruction loss) or frozen (ablation: early blocks not trained)",
        choices=["recon", "frozen"],
    )
    aux_loss: str = option(
        "recon",
        "LoPT: local objective of the non-final blocks: recon (the paper's: mean squared error between the head's "
        "reconstruction and the block's input) or recon_normalized (that error divided by each token's variance of "
        "the block's input over the hidden dimension, so every block's loss is on one scale, about 1, whatever the "
        "residual stream's magnitude at its depth)",
        choices=["recon", "recon_normalized"],
    )
    lambda_aux: float = option(10.0, "LoPT: weight of the mean local loss in the objective")
    lr_k1: float | None = option(
        None, "LoPT: learning rate of embeddings, early blocks and heads (default: --learning_rate)"
    )
    clip_per_block: bool = option(
        False,
        "LoPT: --max_grad_norm clips each block's gradients (embeddings with block 1, each head with its block, final "
        "norm and LM head with the final block) by that block's own norm instead of all by the global norm, so one "
        "block's large local gradient cannot shrink the final block's task gradient (`lopt sft --block_step` "
        "always does)",
    )
    backward: str = option(
        "local",
        "LoPT: local (block by block, frees activations) or joint (one backward, as the reference)",
        choices=["local", "joint"],
    )

    @property
    def canonical_method(self) -> str:
        return METHODS[self.method]

    @property
    def lopt(self) -> LoptSettings | None:
        """LoPT's settings, or None for end-to-end training: the one answer to "is this LoPT"."""
        return lopt_settings(self)


def lopt_settings(config) -> LoptSettings | None:
    if config.canonical_method == "e2e":
        return None
    from lopt.models.local_learning import LoptSettings  # here: it imports torch, which --help does without

    return LoptSettings(
        num_blocks=config.num_blocks, lambda_aux=config.lambda_aux, early_blocks=config.early_blocks,
        aux_loss=config.aux_loss, backward=config.backward, lr_k1=config.lr_k1, clip_per_block=config.clip_per_block,
        block_step=getattr(config, "block_step", False),  # an SFT flag
    )  # fmt: skip


def validate_method(config) -> None:
    """--method against LoPT's flags: e2e takes none of them, LoPT needs 2 blocks or more."""
    if config.canonical_method == "e2e":
        for name in LOPT_ONLY:
            if name in config.explicit:
                raise LoptError(f"--{name} applies to --method lopt only; drop it or use --method lopt.")
    elif config.num_blocks < 2:
        raise LoptError(
            f"--num_blocks {config.num_blocks}: LoPT needs at least 2 blocks. Use --num_blocks 2 (the paper's default) "
            "or --method e2e for end-to-end training."
        )


def validate_block_step(config) -> None:
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


def validate_clip_per_block(config) -> None:
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
