"""Stable identities for prompts, completions and pairs.

Duplicate and conflict detection, splits and score files all need to ask "is this the same
prompt / the same response?". They ask it here, through one canonical form, so that a pair
split by `data split` and a pair scored by `data score` are recognised as the same pair.

A key is a 16-byte BLAKE2b digest: small enough to keep millions in memory, and the
chance that two different texts collide is negligible (about 2**-64 at a billion texts).
"""
from __future__ import annotations

import hashlib
import json

from .records import Pair, Text


def canonical(value: Text) -> str:
    """The text a key is taken from: a string as is; chat messages as sorted-key JSON."""
    if isinstance(value, str):
        return "s" + value
    return "m" + json.dumps(value, sort_keys=True, ensure_ascii=False)


def text_key(value: Text, salt: bytes = b"") -> bytes:
    digest = hashlib.blake2b(salt, digest_size=16)
    # surrogatepass: records with lone surrogates are rejected upstream, but a key must never raise.
    digest.update(canonical(value).encode("utf-8", "surrogatepass"))
    return digest.digest()


def fast_key(value: Text) -> int:
    """An in-process identity (Python's 64-bit string hash), for duplicate and conflict checks
    within one run: about 5x cheaper than `text_key`. Two different texts share it with
    probability about 2**-64 per comparison; it is not stable across processes."""
    return hash(value) if isinstance(value, str) else hash(canonical(value))


def pair_id(pair: Pair) -> str:
    """A short hex id of (prompt, chosen, rejected), written by `data score` to match rows back."""
    digest = hashlib.blake2b(digest_size=8)
    for value in (pair.prompt, pair.chosen, pair.rejected):
        digest.update(text_key(value))
    return digest.hexdigest()


def unit_interval(value: Text, seed: int) -> float:
    """A deterministic number in [0, 1) from a text and a seed (used to split by prompt)."""
    key = text_key(value, salt=f"split:{seed}".encode())
    return int.from_bytes(key[:8], "big") / 2.0 ** 64
