"""`lopt eval RM_DIR --reward_model`: a reward model's pairwise accuracy on held-out preference pairs.

A pair counts as right when the model scores the chosen answer above the rejected one. The texts are tokenized as
`lopt rm` trained on them: through TRL's RewardTrainer preparation (the chat template for conversations, an eos
token after a text answer), so a score here is the score training saw. Held out: for the offline gsm-symbolic pair
presets, pairs built from problems generated from the evaluation seed, none of them a problem the run trained on;
for the hub presets, their "test" split; a --pairs file is read whole.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch

from lopt.data.generated import DEFAULT_GSM_SAMPLES, answer_pairs, reasoning_pairs
from lopt.data.presets import PREFERENCE_HUB, preference_records
from lopt.data.tasks import EVAL_SEED, TASKS
from lopt.errors import LoptError

DEFAULT_PAIRS = "gsm-symbolic-reasoning-pairs"
# the offline presets, built from held-out problems
PAIR_BUILDERS = {"gsm-symbolic-reasoning-pairs": reasoning_pairs, "gsm-symbolic-pairs": answer_pairs}


def heldout_pairs(source: str, n: int, run_dir: Path | None) -> list[dict]:
    """`n` preference pairs from `source` (a preset or a file) that the run in `run_dir` did not train on."""
    if Path(source).is_file() or Path(source).is_dir():
        return preference_records(train_file=source, max_samples=n, file_flag="--pairs")
    if source in PREFERENCE_HUB:
        return preference_records(source, split="test", max_samples=n, split_flag="the preset's test split")
    if source not in PAIR_BUILDERS:
        return preference_records(source)  # an unknown name: its error lists the presets
    exclude = _trained_questions(run_dir) if run_dir is not None else set()
    return PAIR_BUILDERS[source](TASKS["gsm-symbolic"].heldout(n, exclude), EVAL_SEED)


def _trained_questions(run_dir: Path) -> set[str]:
    """The questions of the offline pairs a reward-model run trained on, from its training_args.json."""
    args_file = run_dir / "training_args.json"
    if not args_file.is_file():
        return set()
    args = json.loads(args_file.read_text())
    if args.get("train_file") or args.get("dataset_name") or args.get("dataset_preset") not in PAIR_BUILDERS:
        return set()
    size = args.get("max_samples") or DEFAULT_GSM_SAMPLES
    trained = preference_records(args["dataset_preset"], max_samples=size, seed=args.get("seed", 42))
    return {pair["prompt"][0]["content"] for pair in trained}


def _tokenized(pairs: list[dict], tokenizer) -> list[dict]:
    """chosen_ids / rejected_ids as TRL's RewardTrainer makes them for training (its `_prepare_dataset` uses nothing
    of the trainer but its arguments, so it runs here without one)."""
    import datasets
    from trl import RewardConfig, RewardTrainer

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        # RewardConfig's own default uses the checkpointing flag transformers 5 renamed; no training runs here
        warnings.simplefilter("ignore", FutureWarning)
        args = RewardConfig(output_dir=scratch, max_length=None, report_to="none", bf16=False)
        prepared = RewardTrainer._prepare_dataset(None, datasets.Dataset.from_list(pairs), tokenizer, args, "eval")
    return [{"chosen_ids": row["chosen_ids"], "rejected_ids": row["rejected_ids"]} for row in prepared]


@torch.no_grad()
def _scores(model, token_ids: list[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(token_ids), batch_size):
        rows = token_ids[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        scores.append(model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu())
    return torch.cat(scores)


def pairwise_accuracy(model, tokenizer, pairs: list[dict], batch_size: int) -> dict:
    """Scores of every chosen and rejected answer: the share ranked right and the mean margin."""
    if not pairs:
        raise LoptError("no preference pairs to evaluate the reward model on; pass --pairs or raise --eval_samples.")
    tokenized = _tokenized(pairs, tokenizer)
    chosen = _scores(model, [t["chosen_ids"] for t in tokenized], tokenizer.pad_token_id, batch_size)
    rejected = _scores(model, [t["rejected_ids"] for t in tokenized], tokenizer.pad_token_id, batch_size)
    margins = chosen - rejected
    return {
        "n": len(pairs),
        "correct": int((margins > 0).sum()),
        "pairwise_accuracy": float((margins > 0).float().mean()),
        "mean_margin": float(margins.mean()),
    }
