"""Benchmark contamination: word n-grams shared between preference pairs and benchmark texts.

Text is normalised (Unicode NFKC, case-folded) and cut into words (`\\w+` runs); a pair is
contaminated when its prompt, chosen or rejected text contains any n consecutive words
(n = 13 by default, as in the GPT-3 paper) that also occur in a benchmark text.

Speed matters (100,000 pairs of 1 KB in a few seconds), so no Python object is made per
word. A chunk of texts is normalised into one byte buffer; numpy finds the words, gives each
a 64-bit polynomial hash (from prefix sums), marks the words some benchmark may contain (a
Bloom filter: a window with any other word cannot match), and hashes each window of n such words. Only
windows whose hash is a benchmark n-gram's are then compared word by word with the exact
n-gram table, so a hash collision can never report a false match.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import UserError
from .records import Pair

DEFAULT_NGRAM = 13
_WORD = re.compile(r"\w+")
# ASCII fast path: letters (lower-cased), digits and "_" are kept and every other byte
# becomes a space, which is exactly `\w+` on case-folded ASCII.
_ASCII_WORDS = bytes((c | 0x20 if 65 <= c <= 90 else c) if c < 128 and (chr(c).isalnum() or c == 95)
                     else 32 for c in range(256))
_SPACE = 32
# Between two texts of a buffer: "\x01" is a word of its own that normalisation never
# produces, so it is in no benchmark and no n-gram can span two texts.
_SEPARATOR = b" \x01 "
_P = 0x9E3779B97F4A7C15          # odd, so invertible modulo 2**64
_P_INV = pow(_P, -1, 2 ** 64)
_BASE = np.uint64(0xC2B2AE3D27D4EB4F)  # multiplier of the n-gram (window) hash


class BenchmarkError(UserError):
    """A benchmark source that cannot be read (exit code 2)."""


def normalise(text: str) -> bytes:
    """The text's words (NFKC, case-folded, `\\w+` runs) in UTF-8, separated by spaces."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_WORDS)
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD.findall(text)).encode("utf-8", "surrogatepass")


def words(text: str) -> list[bytes]:
    """Normalised words of a text, as the matcher sees them."""
    return normalise(text).split()


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
        self.table: dict[tuple, list[int]] = {}  # n words (bytes) -> source indices
        self.sources: list[Source] = []
        self.benchmarks: dict[str, int] = {}     # benchmark name -> items indexed
        self.too_short = 0                        # items with fewer than n words (unmatchable)
        self._vocab: list[np.ndarray] = []        # word hashes of the benchmark texts
        self._present = np.zeros(1, dtype=bool)     # filter: may this word be a benchmark word?
        self._gram_hashes = np.zeros(0, dtype=np.uint64)

    def add(self, source: Source, texts: Iterable[str]) -> None:
        index = len(self.sources)
        self.sources.append(source)
        self.benchmarks[source.benchmark] = self.benchmarks.get(source.benchmark, 0) + 1
        longest = 0
        for text in texts:
            buf = np.frombuffer(normalise(text), dtype=np.uint8)
            starts, ends, hashes = _scan(buf)
            longest = max(longest, len(starts))
            self._vocab.append(hashes)
            tokens = [buf[s:e].tobytes() for s, e in zip(starts.tolist(), ends.tolist())]
            for start in range(len(tokens) - self.n + 1):
                owners = self.table.setdefault(tuple(tokens[start:start + self.n]), [])
                if not owners or owners[-1] != index:
                    owners.append(index)
        if longest < self.n:
            self.too_short += 1

    def freeze(self) -> "NgramIndex":
        """Build the sorted hash arrays `match` searches; call after the last `add`."""
        vocab = np.unique(np.concatenate([np.zeros(0, dtype=np.uint64)] + self._vocab))
        # A one-hash Bloom filter: 16+ slots per word keep false positives near 6% or fewer, and
        # a false positive only costs a window hash (the n-gram check is exact); no false negatives.
        size = 1 << int(min(max(16, np.ceil(np.log2(max(len(vocab), 1) * 16))), 30))
        self._present = np.zeros(size, dtype=bool)
        self._present[vocab & np.uint64(size - 1)] = True
        if self.table:
            flat = b" ".join(w for gram in self.table for w in gram)
            _, _, hashes = _scan(np.frombuffer(flat, dtype=np.uint8))
            self._gram_hashes = np.unique(_window_hashes(hashes, self.n, np.arange(0, len(hashes), self.n)))
        return self

    def __len__(self) -> int:
        return len(self.table)

    def match(self, texts: Sequence[str]) -> list[set[int]]:
        """For each text, the indices (into `sources`) of benchmark items it shares an n-gram with."""
        hits = self.match_sparse(texts)
        return [hits.get(i, set()) for i in range(len(texts))]

    def match_sparse(self, texts: Sequence[str]) -> dict[int, set[int]]:
        """{text index: source indices} for the texts that share an n-gram with a benchmark."""
        found: dict[int, set[int]] = {}
        if not self.table or not texts:
            return found
        pieces = [normalise(t) for t in texts]
        text_starts = np.cumsum([0] + [len(p) + len(_SEPARATOR) for p in pieces[:-1]])
        buf = np.frombuffer(_SEPARATOR.join(pieces), dtype=np.uint8)
        starts, ends, hashes = _scan(buf)
        windows = len(hashes) - self.n + 1
        if windows <= 0:
            return found
        absent = ~self._present[hashes & np.uint64(len(self._present) - 1)]
        unknown = np.concatenate(([0], np.cumsum(absent)))
        candidates = np.flatnonzero(unknown[self.n:] == unknown[:windows])  # windows of benchmark words
        if not len(candidates):
            return found
        grams = _window_hashes(hashes, self.n, candidates)
        slot = np.minimum(np.searchsorted(self._gram_hashes, grams), len(self._gram_hashes) - 1)
        for pos in candidates[self._gram_hashes[slot] == grams].tolist():
            gram = tuple(buf[starts[k]:ends[k]].tobytes() for k in range(pos, pos + self.n))
            owners = self.table.get(gram)
            if owners:  # None only on a 64-bit hash collision
                text = int(np.searchsorted(text_starts, starts[pos], side="right")) - 1
                found.setdefault(text, set()).update(owners)
        return found


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
    for t, found in sorted(index.match_sparse(texts).items()):
        i, name = owners[t]
        fields, sources = hits.setdefault(i, ([], set()))
        if name not in fields:
            fields.append(name)
        sources |= found
    return [{"line": pairs[i].line, "fields": fields,
             "items": [{"benchmark": index.sources[s].benchmark, "item": index.sources[s].item}
                       for s in sorted(sources)]}
            for i, (fields, sources) in sorted(hits.items())]


class _Powers:
    """P**k and P**-k modulo 2**64 for k < size, grown on demand."""
    up = np.ones(1, dtype=np.uint64)
    down = np.ones(1, dtype=np.uint64)

    @classmethod
    def get(cls, size: int) -> tuple[np.ndarray, np.ndarray]:
        if len(cls.up) < size:
            grown = max(size, 2 * len(cls.up))
            one = np.ones(1, dtype=np.uint64)
            cls.up = np.concatenate((one, np.cumprod(np.full(grown - 1, _P, dtype=np.uint64))))
            cls.down = np.concatenate((one, np.cumprod(np.full(grown - 1, _P_INV, dtype=np.uint64))))
        return cls.up[:size], cls.down[:size]


def _scan(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Words of a normalised buffer (runs of non-space bytes): starts, ends and 64-bit hashes.

    hash(word at [s, e)) = sum_k (buf[s + k] + 1) * P**k mod 2**64, read off prefix sums
    T[i] = sum_{j < i} (buf[j] + 1) * P**j as (T[e] - T[s]) * P**-s.
    """
    is_word = buf != _SPACE
    edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return starts, ends, np.zeros(0, dtype=np.uint64)
    up, down = _Powers.get(len(buf))
    zero = np.zeros(1, dtype=np.uint64)  # a plain [0] would turn the uint64 sums into float64
    prefix = np.concatenate((zero, np.cumsum((buf.astype(np.uint64) + np.uint64(1)) * up, dtype=np.uint64)))
    return starts, ends, (prefix[ends] - prefix[starts]) * down[starts]


def _window_hashes(values: np.ndarray, n: int, positions: np.ndarray) -> np.ndarray:
    """Polynomial hash (mod 2**64) of the length-n windows of `values` starting at `positions`."""
    out = np.zeros(len(positions), dtype=np.uint64)
    for k in range(n):  # uint64 arithmetic wraps around, which is the modulus we want
        out = out * _BASE + values[positions + k]
    return out
