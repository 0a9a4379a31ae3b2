"""A reward model as one of RL's rewards (`lopt grpo --reward_model`, `lopt rloo --reward_model`): checked, then loaded.

TRL scores a completion with a reward model itself (GRPOTrainer / RLOOTrainer `_calculate_rewards`): prompt and
completion as text (through the reward model's chat template when the prompts are conversations), tokenized with the
reward model's tokenizer, its one logit at the last non-padding token. So the folder must hold a sequence classifier
with one label and a pad token id, and a tokenizer that can render the prompts: checked here, before anything trains.
"""

from __future__ import annotations

import torch

from lopt.errors import LoptError
from lopt.models.registry import load_model_and_tokenizer, resolve_model

FLAG = "--reward_model"


def check_reward_model_config(name_or_path: str, what: str = FLAG) -> None:
    """Refuse a folder that is not a one-score sequence classifier with a pad token id: what it is, and the fix.
    `what` names the argument that gave the folder in errors."""
    from transformers import AutoConfig

    resolved = resolve_model(name_or_path, what)
    config = AutoConfig.from_pretrained(resolved)
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise LoptError(
            f"{what} {name_or_path} is {', '.join(architectures) or 'a model without architectures'} "
            f"({config.model_type}), not a reward model (a ...ForSequenceClassification with one label). Train one "
            f"with `lopt rm --model_name_or_path MODEL --output_dir DIR` and pass DIR."
        )
    if config.num_labels != 1:
        raise LoptError(
            f"{what} {name_or_path} is a classifier with {config.num_labels} labels; a reward model gives one score "
            "(num_labels 1). Train one with `lopt rm`."
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config.pad_token_id is None:
        raise LoptError(
            f"{what} {name_or_path} has no pad_token_id in its config.json: its score is read at each text's last "
            "non-padding token, which it cannot find without one. Set pad_token_id there to its tokenizer's pad "
            "token id (`lopt rm` writes it)."
        )


def load_reward_model(name_or_path: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) of a checked reward model, frozen, in eval mode on `device`."""
    name_or_path = name_or_path.rstrip("/")  # TRL names its scores after the last part (rewards.reward_model_name)
    check_reward_model_config(name_or_path)
    model, tokenizer = load_model_and_tokenizer(name_or_path, dtype=dtype, device=device, what=FLAG, reward_model=True)
    model.requires_grad_(False)
    return model, tokenizer


def tokenizer_note(reward_tokenizer, policy_tokenizer, conversations: bool) -> str | None:
    """What to tell about the reward model's tokenizer next to the policy's: None when they are the same; a LoptError
    when it cannot render conversational prompts."""
    if conversations and not reward_tokenizer.chat_template:
        raise LoptError(
            f"the prompts are conversations (the policy's tokenizer has a chat template), but the {FLAG} tokenizer has "
            "no chat template to render them with; use a reward model trained from a chat model (`lopt rm "
            "--model_name_or_path` the policy's starting model), or add a chat_template to its tokenizer_config.json."
        )
    if reward_tokenizer.get_vocab() == policy_tokenizer.get_vocab() and (
        reward_tokenizer.chat_template == policy_tokenizer.chat_template
    ):
        return None
    return (
        f"the {FLAG} tokenizer differs from the policy's: each prompt and completion is scored as text, re-tokenized "
        "with the reward model's tokenizer (and its chat template)"
    )
