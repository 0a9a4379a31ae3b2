"""`--optim`: the optimizers lopt builds, by transformers' names for the same optimizers (TrainingArguments.optim), so a
TRL user's value means what it means there. The flag's choices are these names, checked where the flag is parsed;
training/optim.py builds the one named."""

# The 8-bit ones keep AdamW's two moments block-wise quantized to 8 bits (bitsandbytes; tensors under 4,096
# elements keep 32-bit state): a quarter of the state's memory.
OPTIMIZERS = {
    "adamw_torch": "torch.optim.AdamW, 32-bit state (8 bytes per trainable parameter)",
    "adamw_8bit": "bitsandbytes' AdamW8bit: 8-bit state (about 2 bytes per trainable parameter), CPU and CUDA",
    "paged_adamw_8bit": "bitsandbytes' PagedAdamW8bit: the 8-bit state in CUDA unified memory, paged out to CPU RAM "
    "when the GPU runs short (CUDA only)",
}
