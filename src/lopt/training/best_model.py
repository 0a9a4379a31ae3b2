"""--load_best_model_at_end: which checkpoint's weights become the final model, and saving them as it.

The loop keeps the best validation's checkpoint (never pruned, see checkpoint.prune_checkpoints); at the end
its files, not the weights in memory, are saved as the final model, unless the last validation was the best.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from lopt.models.lora import is_adapter_folder
from lopt.models.registry import load_model_and_tokenizer
from lopt.parallel import distributed
from lopt.training.checkpoint import TRAINING_STATE

logger = logging.getLogger(__name__)


def best_to_restore(best: Path | None, best_step: int | None, last_step: int) -> Path | None:
    """The checkpoint (`best`, the best validation's at `best_step`) whose weights become the final model; None: the
    weights in memory (the last validation was the best, or there is none). The main process decides for all:
    gathering the weights in memory instead is a collective."""
    best = best if best_step != last_step else None
    if best is not None and distributed.is_main_process() and not (best / TRAINING_STATE).is_file():
        logger.warning(
            "--load_best_model_at_end: the best validation's checkpoint %s is gone; the final model is the last "
            "weights (step %d) instead",
            best, last_step,
        )  # fmt: skip
        best = None
    return distributed.broadcast_from_main(best)


class CheckpointModel:
    """A checkpoint's model saved as the final one: its files as they are, or with `merge_lora` (--merge_lora) an
    adapter checkpoint merged into its base model, loaded in `dtype`."""

    def __init__(self, folder: Path, merge_lora: bool, dtype: torch.dtype, trust_remote_code: bool):
        self.folder, self.merge_lora, self.dtype, self.trust_remote_code = folder, merge_lora, dtype, trust_remote_code

    def save_pretrained(self, output_dir: Path, tokenizer=None) -> None:
        if self.merge_lora and is_adapter_folder(self.folder):
            # loads the base model the adapter names and merges the adapter in (on the CPU: the run is over)
            model, _ = load_model_and_tokenizer(
                str(self.folder), dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
            model.save_pretrained(output_dir, safe_serialization=True)
            tokenizer.save_pretrained(output_dir)
            return
        for path in self.folder.iterdir():  # the model and tokenizer files; not the optimizer's (subfolders)
            if path.is_file() and path.name != TRAINING_STATE:
                shutil.copy2(path, output_dir / path.name)
