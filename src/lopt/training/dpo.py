"""DPO, end-to-end or with LoPT, on TRL's DPOTrainer.

How LoPT enters TRL is in trl_lopt.py. The reference model is the frozen starting model: TRL loads
it again from the policy's own folder (the policy's config names it), so it carries none of the
LoPT hooks and runs without gradients.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from lopt.config import DPOConfig, save_config
from lopt.data.presets import dpo_records
from lopt.errors import LoptError
from lopt.training.checkpoint import save_final_model
from lopt.training.sft import build_model, console, prepare_output_dir
from lopt.training.trl_lopt import LoptTrainerMixin, MetricsCallback, trl_arguments

# metrics.jsonl columns that DPO adds to the shared schema, and the TRL log keys they come from
DPO_METRICS = {"reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins",
               "reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected"}


@dataclass
class DPOResult:
    output_dir: Path
    steps: int
    losses: list[float]  # DPO loss per logged step
    elapsed_s: float


def _is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def run_dpo(config: DPOConfig) -> DPOResult:
    if config.resume_from_checkpoint:
        raise LoptError("--resume_from_checkpoint is not supported by `lopt dpo` yet; start a new run.")
    import datasets
    from transformers import set_seed
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    class LoptDPOTrainer(LoptTrainerMixin, DPOTrainer):
        pass

    out = prepare_output_dir(config)
    set_seed(config.seed)  # before the heads are initialized
    args = trl_arguments(TRLDPOConfig, config, beta=config.beta, loss_type=config.loss_type,
                         max_length=config.max_seq_length)
    device = args.device
    wrapper, tokenizer = build_model(config, device)
    records = dpo_records(
        config.dataset_preset, dataset_name=config.dataset_name, dataset_config=config.dataset_config,
        train_file=config.train_file, split=config.split, max_samples=config.max_samples, seed=config.seed,
    )
    if _is_conversation(records[0]["chosen"]) and not tokenizer.chat_template:
        raise LoptError(
            f"the DPO data is in chat format but the tokenizer of {config.model_name_or_path} has no chat template; "
            "use a chat model or text prompt/chosen/rejected records (--train_file)."
        )
    save_config(config, out / "training_args.json")
    metrics_path = out / "metrics.jsonl"
    try:
        trainer = LoptDPOTrainer(
            model=wrapper.model, args=args, train_dataset=datasets.Dataset.from_list(records),
            processing_class=tokenizer, lopt=wrapper, backward=config.backward, lr_k1=config.lr_k1,
        )
    except (ValueError, ImportError) as error:  # TRL's checks of the settings and the data
        raise LoptError(f"TRL's DPOTrainer rejected these settings or data: {error}") from error
    if len(trainer.train_dataset) == 0:  # TRL drops pairs whose prompt alone fills max_length
        raise LoptError(
            f"every prompt is at least --max_seq_length {config.max_seq_length} tokens long, so no answer token is left "
            "to train on; raise --max_seq_length."
        )
    trainer.add_callback(MetricsCallback(metrics_path, wrapper, trainer.saved_meter, device, DPO_METRICS))

    console.print(
        f"[bold]lopt dpo[/]: {config.canonical_method}"
        + (f" k={wrapper.num_blocks}, {config.backward} backward" if wrapper.num_blocks > 1 else "")
        + f" | {len(records)} pairs | beta {config.beta}, loss {config.loss_type} | device {device}"
    )
    start = time.perf_counter()
    trainer.train()
    save_final_model(out, wrapper, tokenizer)
    logged = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return DPOResult(output_dir=out, steps=trainer.state.global_step, losses=[r["task_loss"] for r in logged],
                     elapsed_s=time.perf_counter() - start)
