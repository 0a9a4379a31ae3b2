"""LoPT inside TRL's trainers: the pieces GRPO, RLOO, DPO, KTO and reward models share.

mixin.py (LoptTrainerMixin: the narrowest hooks), arguments.py (lopt's flags as TRL's config), bridge.py (TRL's
logs and events as lopt's metrics contract and listeners), trackers.py (lopt's config in the trackers TRL's
integrations start), runner.py (a run: output folder, resume, signals, final model), preference.py (the recipes
trained on preference data, declared as data).

TRL trains the plain Hugging Face model (`LocalLearningLM.model`). The wrapper's hooks sit on that
model's decoder layers, so every forward TRL runs already detaches hidden states at the block
boundaries; the wrapper itself stays outside TRL and holds the reconstruction heads. The mixin below
changes a TRL trainer at the narrowest hooks only, and never TRL's loss code:

- `compute_loss` runs TRL's own `compute_loss` inside `wrapper.boundary_step(...)`. With local
  backward each block's weighted local loss is back-propagated through `accelerator.backward` as
  soon as the block has run (its activations are freed before the next block runs); with joint
  backward the local losses are added to the loss TRL returns. Either way they are scaled exactly
  as TRL's loss is for gradient accumulation. Reference-model, old-log-prob and generation passes
  run without gradients, where the boundary hooks do nothing.
- `create_optimizer` uses lopt's `build_optimizer` (the `--lr_k1` groups, heads included).
- `_clip_grad_norm` clips over the model and the heads together, as the SFT loop does (LoPT:
  `training/optim.clip_gradients` over the blocks, by the global norm or, with --clip_per_block, each
  block by its own), and keeps each block's norm for `block_grad_norm`; after the optimizer step a
  callback zeroes the heads' gradients, as the Trainer does the model's.
- `training_step` counts the bytes saved for backward (`SavedTensorMeter`) for `metrics.jsonl`.
  With several processes (torchrun / accelerate launch) and LoPT, it runs TRL's step under
  `accelerator.no_sync`, so DistributedDataParallel never all-reduces, and at the end of each
  accumulation window (`accelerator.sync_gradients`) averages the gradients of the model and of the
  heads across processes itself: the mean DDP would have taken, before the trainer clips. E2E runs
  stay on DDP's own path. LoPT is data-parallel only: a sharding launch (FSDP, DeepSpeed) is refused.
- `_save_checkpoint` adds the heads to TRL's checkpoint folder (never to the model files) in
  `training_state.pt`, written last, after the folder is fsynced: it marks the checkpoint complete.
  It also applies `--save_total_limit`, counting complete checkpoints only.
- `_load_from_checkpoint` (resume) restores the heads next to the model; TRL's Trainer restores the
  optimizer, the schedule, the RNG states and the position in the data.
- `log` adds the metrics contract's fields TRL does not log itself (`lopt/lr`, `lopt/lr_k1`,
  `lopt/tokens_per_s`, `lopt/peak_mem_bytes`, `lopt/activation_peak_bytes`, `lopt/elapsed_s`) to TRL's
  logs of each logging step, next to `lopt/task_loss` and `lopt/aux_loss_block_<i>`. The Trainer hands
  those logs to every callback: the reporting integrations of `--report_to` (training/trackers.py) and
  `TRLBridge`, which writes metrics.jsonl from them, so both show the same values.
- As in the SFT loop, a NaN/inf loss stops the run before its optimizer step, and SIGINT / SIGTERM
  finish the step in flight, save a checkpoint and exit with 130 / 143 (`_StopOnSignal`).
- Validation (--eval_*) is TRL's own evaluation (`validation_arguments`: eval_strategy "steps",
  load_best_model_at_end, metric_for_best_model; transformers' EarlyStoppingCallback). `compute_loss`
  measures each block's local loss beside TRL's validation loss, and `TRLBridge` writes a validating
  step's metrics.jsonl row with the validation's values (eval_task_loss is TRL's eval_loss).
"""
