"""Tiny random models of every supported family and a tiny tokenizer, built in the test process (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

# SmolLM2-Instruct's template, verbatim: ChatML with a default system prompt.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "</s>"]
CORPUS = [
    "What is 2 + 2? The answer is 4.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "### User:\nHello there\n\n### Assistant:\nHi! How can I help?",
    "system user assistant question answer solution problem",
]
BPE_VOCAB = 400
VOCAB = BPE_VOCAB  # the tiny models' vocabulary covers the tiny tokenizer's


def train_tiny_bpe() -> Tokenizer:
    """A byte-level BPE trained in-process on a few strings (every byte is encodable)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def make_tokenizer(bpe: Tokenizer, *, chat_template: str | None, eos_token: str = "<|im_end|>"):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos_token, pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)

CONFIGS = {
    "llama": lambda layers: LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=True, **_COMMON),
    "qwen2": lambda layers: Qwen2Config(num_hidden_layers=layers, tie_word_embeddings=True, **_COMMON),
    "qwen3": lambda layers: Qwen3Config(num_hidden_layers=layers, head_dim=8, tie_word_embeddings=True, **_COMMON),
    "mistral": lambda layers: MistralConfig(num_hidden_layers=layers, **_COMMON),
    "gpt2": lambda layers: GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
}
FAMILIES = sorted(CONFIGS)


def tiny_model(family: str = "llama", layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family](layers)
    config.pad_token_id = 0
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_batch(batch: int = 2, seq: int = 12, prompt: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch: the last row is 3 tokens shorter; prompt tokens are masked out of the loss."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, seq - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_model_dir(folder: Path, family: str = "llama", layers: int = 4) -> Path:
    """A saved tiny model + ChatML tokenizer: a local --model_name_or_path for end-to-end runs."""
    tokenizer = make_tokenizer(train_tiny_bpe(), chat_template=CHATML)
    model = tiny_model(family, layers)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
