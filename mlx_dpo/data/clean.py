"""`data clean`: write a copy of a pairs file without the records that should not train.

Removed: malformed records (chosen == rejected among them), exact duplicates (the first copy
stays), pairs in conflicting preferences (per the chosen policy, see conflicts.py) and, when
benchmarks are given, pairs that share an n-gram with them. Kept records are copied byte for
byte, extra fields included. The output appears only when complete (temp file, then rename);
it may not be the input (the original would be lost) and an existing one is replaced only with
overwrite (--force).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from .conflicts import PairIndex, is_identical_pair
from .benchmarks import load_benchmarks
from .decontamination import DEFAULT_NGRAM, contaminated_pairs
from .files import check_outputs, copy_lines
from .keys import fast_key
from .records import RecordError, iter_records, no_valid_pairs

CHUNK = 4096


@dataclass
class CleanResult:
    path: str
    out: str
    read: int = 0                  # non-blank records in the input
    kept: int = 0
    malformed: list = field(default_factory=list)       # RecordError, chosen == rejected included
    identical: int = 0
    duplicates: list = field(default_factory=list)      # lines removed as exact duplicates
    conflicts: list = field(default_factory=list)       # lines removed to resolve conflicts
    contaminated: list = field(default_factory=list)    # lines removed as contaminated

    def to_dict(self) -> dict:
        return {"path": self.path, "out": self.out, "read": self.read, "kept": self.kept,
                "removed": {"malformed": len(self.malformed) - self.identical,
                            "chosen_equals_rejected": self.identical,
                            "duplicates": len(self.duplicates), "conflicts": len(self.conflicts),
                            "contaminated": len(self.contaminated)},
                "malformed": [{"line": e.line, "reason": e.reason} for e in self.malformed],
                "duplicate_lines": self.duplicates, "conflict_lines": self.conflicts,
                "contaminated_lines": self.contaminated}


def clean_pairs(path, out, conflicts: str = "drop", benchmarks: Optional[Sequence[str]] = None,
                ngram: int = DEFAULT_NGRAM, overwrite: bool = False) -> CleanResult:
    """Clean `path` into `out`; `benchmarks` (optional) also removes contaminated pairs.
    Raises a RecordError when `path` holds no valid pair (an empty output would only fail later)."""
    check_outputs(path, [out], overwrite)  # `out` is the only file written
    result = CleanResult(str(path), str(out))
    index = load_benchmarks(benchmarks, ngram) if benchmarks else None
    pairs = PairIndex()
    valid, chunk, contaminated = set(), [], set()
    for item in iter_records(path):
        result.read += 1
        if isinstance(item, RecordError):
            result.malformed.append(item)
            result.identical += is_identical_pair(item)
            continue
        valid.add(item.line)
        pairs.add(fast_key(item.prompt), fast_key(item.chosen), fast_key(item.rejected), item.line)
        chunk.append(item)
        if len(chunk) >= CHUNK:
            contaminated |= {c["line"] for c in contaminated_pairs(index, chunk)}
            chunk = []
    if not valid:
        raise no_valid_pairs(path, result.malformed)
    contaminated |= {c["line"] for c in contaminated_pairs(index, chunk)}
    duplicates = {line for line, _ in pairs.duplicates}
    conflicted = pairs.lines_to_drop(conflicts) - duplicates
    result.duplicates = sorted(duplicates)
    result.conflicts = sorted(conflicted - contaminated)
    result.contaminated = sorted(contaminated)
    keep = valid - duplicates - conflicted - contaminated
    result.kept = len(keep)
    copy_lines(path, {line: str(out) for line in keep}, [str(out)])
    return result
