"""The learning-rate schedule that pretraining and post-training share: linear warm-up, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(step: int, lr: float, min_lr: float, warmup: int, steps: int, progress: float = 0.0) -> float:
    """lr at `step`: linear warm-up over `warmup` steps, then cosine from lr to min_lr over the rest of the run.
    The decay follows the larger of the step fraction and `progress` (e.g. the share of a time budget spent)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = max((step - warmup) / max(1, steps - warmup), progress)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))
