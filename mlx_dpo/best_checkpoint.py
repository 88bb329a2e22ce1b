"""The best checkpoint of a run: ranked by `constraints.best_metric`, only among checkpoints
whose validation KL is within `constraints.kl_target`, recorded in OUTPUT_DIR/best.json.

best.json is what a rollback restores and what rotation must keep, so it is written atomically
(temp file + rename) and names a checkpoint folder that exists.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from .config import ConstraintsConfig

BEST_FILE = "best.json"
# Metrics where a larger value is better; everything else (loss, KL, rejected rewards) is minimised.
HIGHER_IS_BETTER = {"eval/rewards/accuracies", "eval/rewards/margins", "eval/preference_gap",
                    "eval/rewards/chosen", "eval/logps/chosen"}


def resolve_mode(metric: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "max" if metric in HIGHER_IS_BETTER else "min"


def within_kl(metrics: dict, kl_target: float) -> bool:
    """A NaN or missing KL is never within the target."""
    kl = metrics.get("eval/kl")
    return kl is not None and math.isfinite(kl) and kl <= kl_target


def read_best(output_dir: Path) -> Optional[dict]:
    """The recorded best, or None when there is none or its checkpoint no longer exists."""
    path = Path(output_dir) / BEST_FILE
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(best, dict) or not (Path(output_dir) / str(best.get("checkpoint"))).is_dir():
        return None
    return best


def write_best(output_dir: Path, record: dict) -> None:
    path = Path(output_dir) / BEST_FILE
    tmp = path.with_name(f".{BEST_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


class BestTracker:
    """Keeps the best checkpoint within kl_target; `consider` is called after each save."""

    def __init__(self, output_dir: Path, constraints: ConstraintsConfig, fresh: bool, enabled: bool = True):
        self.out = Path(output_dir)
        self.metric = constraints.best_metric
        self.mode = resolve_mode(self.metric, constraints.best_mode)
        self.kl_target = constraints.kl_target
        self.enabled = enabled
        if fresh and enabled:  # a new run must not inherit a best from an earlier one
            (self.out / BEST_FILE).unlink(missing_ok=True)
        self.best = None if fresh else read_best(self.out)

    @property
    def protected(self) -> set[str]:
        return {self.best["checkpoint"]} if self.best else set()

    def better(self, value: float) -> bool:
        if self.best is None:
            return True
        old = self.best["value"]
        return value < old if self.mode == "min" else value > old

    def consider(self, folder: Path, step: int, metrics: dict) -> bool:
        """Record `folder` as the best when it is within kl_target and beats the current best."""
        value = metrics.get(self.metric)
        if not self.enabled or value is None or not math.isfinite(value):
            return False
        if not within_kl(metrics, self.kl_target) or not self.better(value):
            return False
        self.best = {"checkpoint": folder.name, "path": str(folder), "step": step, "metric": self.metric,
                     "mode": self.mode, "value": value, "kl": metrics["eval/kl"],
                     "kl_target": self.kl_target, "metrics": metrics}
        write_best(self.out, self.best)
        return True
