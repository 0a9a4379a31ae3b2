"""The flags of the recipes trained on preference data: DPO (TRL's DPOTrainer), reward models (RewardTrainer) and KTO
(KTOTrainer, on the answers of the pairs unpaired)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lopt.config.fields import option
from lopt.config.schema import RunConfig
from lopt.errors import LoptError


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

    dataset_preset: str = option("gsm-symbolic-pairs", f"preference preset: {PRESETS_HELP}")
    max_seq_length: int = option(1024, "truncate prompt + answer to this many tokens")


@dataclass
class DPOConfig(PreferenceConfig):
    """DPO with TRL's DPOTrainer; the reference model is the frozen starting model."""

    learning_rate: float = option(1e-6, "learning rate of the final block, final norm and LM head (all of E2E)")
    metric_for_best_model: str = option(
        "eval_task_loss",
        "validation metric that decides the best model: eval_task_loss (the DPO loss, lower is better), "
        "eval_reward_accuracy or eval_reward_margin (higher is better)",
    )
    beta: float = option(0.1, "DPO temperature: how far the policy may move from the reference model")
    loss_type: str = option("sigmoid", "TRL's DPO loss: sigmoid, ipo, hinge, ... (passed through)")


@dataclass
class RMConfig(PreferenceConfig):
    """A reward model with TRL's RewardTrainer: a one-score head on the model, Bradley-Terry loss on pairs."""

    learning_rate: float = option(1e-5, "learning rate of the final block, final norm and score head (all of E2E)")
    metric_for_best_model: str = option(
        "eval_reward_accuracy",
        "validation metric that decides the best model: eval_reward_accuracy or eval_reward_margin (higher is "
        "better), eval_task_loss (the pairwise loss, lower is better)",
    )
    dataset_preset: str = option("gsm-symbolic-reasoning-pairs", f"preference preset: {PreferenceConfig.PRESETS_HELP}")
    max_seq_length: int = option(1024, "pairs whose prompt + answer is longer than this many tokens are left out")
    center_rewards_coefficient: float | None = option(
        None, "weight of a penalty on the mean squared reward, which keeps rewards centred on 0 (TRL's; off: None)"
    )

    def check_own_flags(self) -> None:
        if self.use_peft:
            raise LoptError(
                "--use_peft with lopt rm: the score head is new and must train in full beside the adapters, which "
                "lopt's adapter checkpoints do not hold yet; train the reward model without --use_peft (it is the size "
                "of the policy), or with --method lopt to cut its activation memory."
            )


@dataclass
class KTOConfig(PreferenceConfig):
    """KTO with TRL's KTOTrainer: each answer of the preference data is an unpaired example, desirable (the chosen
    one) or undesirable (the rejected one); the reference model is the frozen starting model."""

    BEST_MODEL_METRICS: ClassVar[dict[str, bool]] = {"eval_task_loss": False, "eval_reward_margin": True}

    learning_rate: float = option(1e-6, "learning rate of the final block, final norm and LM head (all of E2E)")
    metric_for_best_model: str = option(
        "eval_task_loss",
        "validation metric that decides the best model: eval_task_loss (the KTO loss, lower is better) or "
        "eval_reward_margin (higher is better)",
    )
    beta: float = option(0.1, "KTO temperature: how far the policy may move from the reference model")
    loss_type: str = option(
        "kto", "TRL's KTO loss: kto, or apo_zero_unpaired (passed through)", choices=["kto", "apo_zero_unpaired"]
    )
    desirable_weight: float = option(
        1.0, "weight of the desirable (chosen) answers' losses (TRL's)", group="optimization"
    )
    undesirable_weight: float = option(
        1.0, "weight of the undesirable (rejected) answers' losses (TRL's)", group="optimization"
    )

    def check_own_flags(self) -> None:
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise LoptError(
                    f"--{name} must be above 0, got {getattr(self, name)}; TRL suggests weights that make "
                    "desirable_weight x desirable examples about undesirable_weight x undesirable ones (1 and 1 for "
                    "the answers of preference pairs)."
                )
