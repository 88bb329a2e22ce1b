"""The preference gap: how much better the chosen response is than the rejected one, in [0, 1].

It is measured, never guessed from a proxy such as length. Two sources:

  annotations   `score_chosen` / `score_rejected` in the records (as UltraFeedback ships
                them) on a declared scale [lo, hi]: gap = (score_chosen - score_rejected) / (hi - lo).
  model scores  a file written by `mlx-dpo data score` with a reference model (or any JSONL
                with `reward_margin`, or `reward_chosen` and `reward_rejected`, per pair): the
                Bradley-Terry probability that chosen wins is sigmoid(margin), and
                gap = 2 * sigmoid(margin) - 1, i.e. tanh(margin / 2).

Each pair's gap lies in [-1, 1] (negative: the scores disagree with the label); the reported
average is the mean over scored pairs, floored at 0 so that it stays in [0, 1].
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError

DEFAULT_SCALE = (1.0, 10.0)  # UltraFeedback's overall score scale
_MISSING = object()


class ScoresError(UserError):
    """A scores file that cannot be used (exit code 2)."""


def parse_scale(text: str) -> tuple[float, float]:
    """The declared scale of annotation scores: '1:10' -> (1.0, 10.0); '0-1' and '0,1' work too."""
    for sep in (":", ","):
        if sep in text:
            lo, _, hi = text.partition(sep)
            break
    else:
        lo, _, hi = text.rpartition("-") if text.count("-") == 1 else ("", "", "")
    try:
        low, high = float(lo), float(hi)
    except ValueError:
        raise UserError(f"score scale {text!r}: expected LOW:HIGH, e.g. 1:10") from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise UserError(f"score scale {text!r}: need finite LOW < HIGH")
    return low, high


@dataclass
class GapStats:
    """Accumulates per-pair gaps; `source` says where they come from."""
    source: str
    gaps: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # (line, reason): scores that could not be used
    unscored: int = 0
    inverted: int = 0                             # pairs whose scores prefer the rejected response
    ties: int = 0

    def add(self, gap: float) -> None:
        self.gaps.append(gap)
        self.inverted += gap < 0
        self.ties += gap == 0

    @property
    def available(self) -> bool:
        return bool(self.gaps)

    @property
    def average(self) -> float:
        """Mean gap over scored pairs, floored at 0; NaN when no pair has a score."""
        if not self.gaps:
            return math.nan
        return max(0.0, math.fsum(self.gaps) / len(self.gaps))


class AnnotationGap:
    """Gap from `score_chosen` / `score_rejected` on the declared scale."""

    def __init__(self, scale: tuple[float, float] = DEFAULT_SCALE):
        self.scale = scale
        lo, hi = scale
        self.stats = GapStats(f"annotation scores (score_chosen/score_rejected, scale {lo:g}-{hi:g})")

    def add(self, extra: dict, line: int) -> None:
        chosen, rejected = extra.get("score_chosen", _MISSING), extra.get("score_rejected", _MISSING)
        if chosen is _MISSING or rejected is _MISSING:
            if chosen is _MISSING and rejected is _MISSING:
                self.stats.unscored += 1
            else:
                have = "score_chosen" if rejected is _MISSING else "score_rejected"
                self.stats.problems.append((line, f"has {have} but not its partner"))
            return
        values = _number(chosen), _number(rejected)
        lo, hi = self.scale
        if values[0] is None or values[1] is None:
            self.stats.problems.append((line, "score_chosen/score_rejected must be finite numbers"))
        elif not (lo <= values[0] <= hi and lo <= values[1] <= hi):
            self.stats.problems.append(
                (line, f"scores {values[0]:g}/{values[1]:g} outside the declared scale {lo:g}-{hi:g} "
                       "(set it with --score-scale LOW:HIGH)"))
        else:
            self.stats.add((values[0] - values[1]) / (hi - lo))


class ModelGap:
    """Gap from per-pair reward margins in a scores file, matched to pairs by `id` or `line`."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.margins = _read_margins(Path(path))
        self.stats = GapStats(f"model scores ({Path(path).name}: implicit reward margins)")
        self._by_id = any(isinstance(key, str) for key in self.margins)

    def add(self, pair_id: str, line: int) -> None:
        # Rows with an id must match the pair's content; rows without one match by line.
        row = self.margins.get(pair_id if self._by_id else line)
        if row is None:
            self.stats.unscored += 1
        else:
            self.stats.add(math.tanh(row["margin"] / 2.0))


def _read_margins(path: Path) -> dict:
    if not path.is_file():
        raise ScoresError(f"scores file not found: {path}")
    rows: dict = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):
                raise ScoresError(f"{path}:{number}: not valid JSON") from None
            margin = _margin(obj)
            if margin is None:
                raise ScoresError(
                    f"{path}:{number}: no reward margin; a gap needs implicit rewards, so score with "
                    "`mlx-dpo data score ... --reference MODEL` (or give reward_margin per row)")
            key = obj.get("id") if isinstance(obj.get("id"), str) else obj.get("line")
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise ScoresError(f"{path}:{number}: each row needs an `id` (pair id) or a `line`")
            rows[key] = {"margin": margin}
    if not rows:
        raise ScoresError(f"{path}: no scores in the file")
    return rows


def _margin(obj) -> Optional[float]:
    if not isinstance(obj, dict):
        return None
    if "reward_margin" in obj:
        return _number(obj["reward_margin"])
    chosen, rejected = _number(obj.get("reward_chosen")), _number(obj.get("reward_rejected"))
    return None if chosen is None or rejected is None else chosen - rejected


def _number(value) -> Optional[float]:
    """A finite float from a JSON number, else None (bools, strings, NaN, huge ints)."""
    if type(value) is float:  # the common case first
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
