"""The named variants that `lopt bench` and `lopt demo` compare: each name and the SFT config fields that make it.

One table, so that a variant means the same in the benchmark and in the study: `lopt bench --methods
e2e,lopt+bs+8bit` and `lopt demo`'s lopt-k2, frozen-k2, ... are rows of it. A variant lists only what differs from
`SFTConfig`'s defaults; everything else (data, steps, schedule, seed) is the caller's and shared by all its runs.

The benchmark gives LoPT's block count itself (`--blocks`) and measures every row at one constant learning rate, so
it reads only the fields that shape the step: method, backward, checkpointing, adapters, KL, block steps, optimizer.
The study trains the variants: LoRA at a higher learning rate, as usual practice has it (its update starts at zero
and is scaled by alpha / r), and LoPT at lr_k1 = a tenth of its learning rate (`LR_K1_FRACTION`).
"""

from __future__ import annotations

# A variant's lr_k1 as a fraction of its own learning rate; not an SFTConfig field (`config_fields` makes it lr_k1).
LR_K1_FRACTION = "lr_k1_fraction"
# LoPT's setting in the study: the best of `lopt demo --full --sweep` on aiw (README, "The demo"): lr_k1 a tenth of
# the learning rate won at k=2 (86.0% vs the paper's setting's 63.0%, McNemar p<0.001, and the least KL to the
# starting model) and was best at k=4 (20.0% vs 18.5%, not significant); lambda_aux 1 came second at k=2,
# recon_normalized and clip_per_block did not help. The paper's objective (recon, lambda_aux 10) stays.
LOPT_SETTING = {LR_K1_FRACTION: 0.1}
KL_BETA = 0.1  # the KL-regularized SFT baseline's --kl_beta

_E2E_KL = {"method": "e2e", "kl_beta": KL_BETA}
VARIANTS: dict[str, dict] = {
    # end to end: one block
    "e2e": {"method": "e2e"},
    "e2e+ckpt": {"method": "e2e", "gradient_checkpointing": True},
    "e2e+8bit": {"method": "e2e", "optim": "adamw_8bit"},
    "e2e+kl": _E2E_KL,
    "kl-sft": _E2E_KL,  # the study's name of e2e+kl
    "lora": {"method": "e2e", "use_peft": True, "learning_rate": 1e-3},
    "trl-sft": {"method": "e2e"},  # TRL's SFTTrainer on E2E's step: the benchmark runs it through TRL
    # LoPT at the caller's block count
    "lopt-joint": {"method": "lopt", "backward": "joint"},
    "lopt": {"method": "lopt"},
    "lopt+ckpt": {"method": "lopt", "gradient_checkpointing": True},
    "lopt+bs": {"method": "lopt", "block_step": True},
    "lopt+bs+8bit": {"method": "lopt", "block_step": True, "optim": "adamw_8bit"},
    "lopt+lora": {"method": "lopt", "use_peft": True},
    # LoPT at a block count of its own, in the study's setting
    "lopt-k2": {"method": "lopt", "num_blocks": 2, **LOPT_SETTING},
    "lopt-k4": {"method": "lopt", "num_blocks": 4, **LOPT_SETTING},
    "frozen-k2": {"method": "lopt", "num_blocks": 2, "early_blocks": "frozen"},
    "lopt-k2-lora": {"method": "lopt", "num_blocks": 2, "use_peft": True, "learning_rate": 1e-3, **LOPT_SETTING},
}


def is_lopt(name: str) -> bool:
    """Whether the variant trains in blocks (LoPT), so that a block count applies to it."""
    return VARIANTS[name]["method"] == "lopt"


def config_fields(variant: dict, learning_rate: float) -> dict:
    """A variant's SFTConfig fields: its lr_k1 fraction, if it has one, made a rate of its own learning rate."""
    fields = {name: value for name, value in variant.items() if name != LR_K1_FRACTION}
    if LR_K1_FRACTION in variant:
        fields["lr_k1"] = variant[LR_K1_FRACTION] * variant.get("learning_rate", learning_rate)
    return fields
