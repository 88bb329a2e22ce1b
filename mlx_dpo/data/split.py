"""`data split`: train / validation files, split by prompt so that no prompt is in both.

Each prompt is hashed with the seed to a number u in [0, 1) (keys.unit_interval); its pairs go
to validation when u < val_fraction. The assignment of a prompt never depends on the other
records, so adding data later leaves existing prompts where they were, and the same seed
always gives the same files. The validation share is therefore close to, not exactly,
val_fraction (it is reported).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .files import check_outputs, copy_lines
from .keys import canonical, unit_interval
from .records import RecordError, iter_records, no_valid_pairs


@dataclass
class SplitResult:
    train_path: str
    val_path: str
    train_pairs: int = 0
    val_pairs: int = 0
    train_prompts: int = 0
    val_prompts: int = 0
    skipped: list = field(default_factory=list)  # RecordError (only with on_bad="skip")

    def to_dict(self) -> dict:
        total = self.train_pairs + self.val_pairs
        return {"train": {"path": self.train_path, "pairs": self.train_pairs, "prompts": self.train_prompts},
                "validation": {"path": self.val_path, "pairs": self.val_pairs, "prompts": self.val_prompts},
                "val_share": self.val_pairs / total if total else 0.0,
                "skipped": [{"line": e.line, "reason": e.reason} for e in self.skipped]}


def default_outputs(path) -> tuple[str, str]:
    """PAIRS.jsonl -> PAIRS_train.jsonl, PAIRS_val.jsonl beside it."""
    p = Path(path)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.stem
    return str(p.with_name(f"{stem}_train.jsonl")), str(p.with_name(f"{stem}_val.jsonl"))


def split_pairs(path, val_fraction: float = 0.2, seed: int = 0, train_out: Optional[str] = None,
                val_out: Optional[str] = None, on_bad: str = "error", overwrite: bool = False) -> SplitResult:
    """Write the train and validation files; raise RecordError on a malformed record unless
    on_bad="skip" (then it is left out and reported)."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    default_train, default_val = default_outputs(path)
    train_out, val_out = str(train_out or default_train), str(val_out or default_val)
    if Path(train_out).resolve() == Path(val_out).resolve():
        raise UserError(f"train and validation outputs are the same file: {train_out}")
    check_outputs(path, (train_out, val_out), overwrite)
    result = SplitResult(train_out, val_out)
    routes: dict[int, str] = {}
    side_of: dict[str, bool] = {}  # prompt -> goes to validation
    for item in iter_records(path):
        if isinstance(item, RecordError):
            if on_bad != "skip":
                raise item
            result.skipped.append(item)
            continue
        key = canonical(item.prompt)
        to_val = side_of.get(key)
        if to_val is None:
            to_val = side_of[key] = unit_interval(item.prompt, seed) < val_fraction
        routes[item.line] = val_out if to_val else train_out
    if not routes:
        raise no_valid_pairs(path, result.skipped)
    counts = copy_lines(path, routes, [train_out, val_out])
    result.train_pairs, result.val_pairs = counts[train_out], counts[val_out]
    result.val_prompts = sum(side_of.values())
    result.train_prompts = len(side_of) - result.val_prompts
    return result
