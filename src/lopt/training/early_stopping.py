"""The best validation so far, for --load_best_model_at_end and --early_stopping_patience.

A plain loop (recipes/sft.py) counts each validation here; the record travels in `training_state.pt`
(`dataclasses.asdict`), so a resumed run keeps its best and its patience.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class BestValidation:
    """The best validation by --metric_for_best_model, and the validations since it (early stopping)."""

    metric: float | None = None
    step: int | None = None
    since: int = 0
    checkpoint: str | None = None  # the best step's checkpoint once written (a resumed run's may be elsewhere)

    def update(self, value: float, step: int, greater_is_better: bool) -> bool:
        """Count validation `value` at `step`; True when it is a new best (strictly better, as transformers')."""
        better = self.metric is None or (value > self.metric if greater_is_better else value < self.metric)
        if better:
            self.metric, self.step, self.since, self.checkpoint = value, step, 0, None
        else:
            self.since += 1
        return better

    def patience_spent(self, patience: int | None) -> bool:
        """Whether --early_stopping_patience validations (None: never) have passed without improvement."""
        return self.since >= (patience or math.inf)
