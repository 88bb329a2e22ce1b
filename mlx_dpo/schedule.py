"""Learning-rate schedules, in plain Python so every engine follows the same curve."""
from __future__ import annotations

import math

from .config import Config


def learning_rate_at(step: int, cfg: Config) -> float:
    """The rate for optimizer step `step` (0-based): linear warm-up that never starts at 0,
    then cosine, linear or constant decay down to min_lr_ratio * peak at max_steps."""
    peak = cfg.training.learning_rate
    warmup, total = cfg.training.warmup_steps, cfg.training.max_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    kind = cfg.optimization.lr_scheduler
    if kind == "constant":
        return peak
    floor = peak * cfg.optimization.min_lr_ratio
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
