"""`lopt bench`: memory and throughput of one training step, E2E vs LoPT, measured side by side.

For each configuration (method, k, backward mode, checkpointing) and batch shape, one training step
(forward + backward + AdamW step) is measured for:
- peak activation memory: the peak of live bytes saved for backward (deterministic, machine-free);
- peak device memory: `torch.cuda.max_memory_allocated` on GPU, the process's peak RSS on CPU;
- step time and tokens/s: the median over `--rounds` x `--steps` timed steps.
Each configuration runs in a fresh subprocess so that peaks never mix, and the configurations are
run round-robin `--rounds` times so that drift of the machine's speed hits them all alike. Every
figure is also given as a ratio to `e2e` at the same batch shape. A second table isolates the loss:
saved bytes of lopt's chunked LM-head cross entropy against full float32 logits. A third pairs
LoPT local backward without checkpointing against E2E with checkpointing: does the memory LoPT saves
let it skip recomputation within E2E+ckpt's memory, and what does that buy in step time?

The baselines users compare LoPT with are rows too: `lora` (E2E with LoRA adapters, peft's defaults as
`lopt sft --use_peft` sets them), `lopt+lora` (LoPT with adapters in every block) and `e2e+kl` (E2E SFT
with --kl_beta 0.1, whose reference is a frozen second copy of the model); for every row the trainable
parameters and the bytes of optimizer state after the step are counted, which is where LoRA saves.
`lopt+bs` is LoPT with --block_step, `+8bit` rows keep AdamW's state in 8 bits (--optim adamw_8bit). `trl-sft` is
TRL's SFTTrainer on the same model and batch (prompt quarter masked, fp32 on CPU, constant rate, no clipping, like
every row): its step time, process peak and loss after the same steps, beside lopt's `e2e`.

The whole step is accounted by hooks, so its figures are the same on every machine: parameters, optimizer state,
the peak of gradients, of activations, and of both alive together. A second, untimed step at a smaller batch gives
each configuration's bytes per sample, from which "the largest micro-batch that fits in B GiB" is computed for
each of `--budgets_gib` (activations grow with the batch, the rest does not).

With `--packing_data` (an SFT file or preset) a last table measures `--packing`: one pass of E2E and LoPT
training over the same tokenized examples, batched one example a row (padded to the batch's longest) and packed
(`pack_examples`), alternating `--rounds` times; it reports padding, optimizer steps, and real (non-padding)
tokens per second, packed over unpacked.

The package, by concern: measure.py (one configuration's step, in its own subprocess), trl.py (the trl-sft row),
packing.py (--packing_data), tables.py (ratios, pairs, budgets and the printed tables), plots.py, cli.py (the flags
and the round-robin driver). The rows are variants of lopt.study.variants, the table the study shares.
"""

from lopt.tools.bench.cli import main

__all__ = ["main"]
