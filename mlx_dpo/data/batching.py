"""Batches: length-grouped order per epoch, padding, masks, and rank shards.

The order of an epoch depends only on (seed, epoch), so a data position is just
(epoch, batch index): resuming needs no sampler state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .tokenize import EncodedPair

PAD_MULTIPLE = 16  # fewer distinct shapes: less padding waste than fixed length, fewer recompiles
GROUP_FACTOR = 32  # batches per length-sorted group: enough sorting to cut padding, still random


@dataclass
class Batch:
    """2B sequences: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    inputs, targets: (2B, T) int32, targets = inputs shifted left by one.
    mask: (2B, T) float32, 1 where the target is a completion token.
    """
    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    num_pairs: int
    num_tokens: int  # real (non-pad) tokens in all 2B sequences
    ref_logps: Optional[np.ndarray] = None  # (2B,) cached reference log-prob sums (refcache.py)
    ref_hidden: Optional[list] = None  # 2B cached reference hidden states, (completion length, D) per row


def grouping_keys(pairs: list[EncodedPair], shared_prompt: bool) -> list[int]:
    """What `epoch_order` sorts pairs by: what their batch pads to. The plain layout pads each
    prompt + completion row to the longest (`EncodedPair.length`). The shared-prompt layout
    (completion.py: [prompt | chosen | rejected] per pair) pads prompts and completions apart,
    the completions twice, so pairs go by their longer completion's padded width first and by
    prompt length among those (on pairs of independently varied lengths, 25-27% of the computed
    tokens were padding against 30-36% when sorted by total length; docs/benchmarks.md)."""
    if not shared_prompt:
        return [p.length for p in pairs]
    return [-(-max(len(p.chosen), len(p.rejected)) // PAD_MULTIPLE) * 2**20 + len(p.prompt) for p in pairs]


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Index batches for one epoch: shuffle, sort by `lengths` (or any sort keys, see
    grouping_keys) inside groups, shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    group = batch_size * GROUP_FACTOR
    batches = []
    for start in range(0, len(order), group):
        chunk = order[start:start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(pairs: list[EncodedPair], pad_id: int) -> Batch:
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    longest = max(len(s) for s in seqs) - 1
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    inputs = np.full((len(seqs), width), pad_id, dtype=np.int32)
    targets = np.full((len(seqs), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), width), dtype=np.float32)
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        n = len(seq) - 1
        inputs[row, :n] = seq[:-1]
        targets[row, :n] = seq[1:]
        # target t is token t+1: completion tokens are targets start-1 ... n-1
        mask[row, start - 1:n] = 1.0
    tokens = sum(len(s) for s in seqs)
    cached = [p.ref_logps for p in pairs]
    ref = None if any(c is None for c in cached) else np.array(
        [c[0] for c in cached] + [c[1] for c in cached], dtype=np.float32)
    hidden = [p.ref_hidden for p in pairs]
    ref_hidden = None if any(h is None for h in hidden) else [h[0] for h in hidden] + [h[1] for h in hidden]
    return Batch(inputs, targets, mask, len(pairs), tokens, ref, ref_hidden)


def shard(indices: np.ndarray, weights: list[float], rank: int) -> np.ndarray:
    """This rank's slice of a global batch, sized in proportion to `weights` (each rank >= 1).

    Largest-remainder rounding keeps the sizes summing to the batch; slices never overlap.
    """
    sizes = split_sizes(len(indices), weights)
    start = sum(sizes[:rank])
    return indices[start:start + sizes[rank]]


def split_sizes(total: int, weights: list[float]) -> list[int]:
    if total < len(weights):
        raise ValueError(f"a batch of {total} cannot give each of {len(weights)} ranks a pair")
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    spare = total - len(weights)  # one pair per rank is reserved up front
    raw = w * spare
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes), kind="stable")[: spare - sizes.sum()]:
        sizes[i] += 1
    return [int(s) + 1 for s in sizes]


def split_pairs(batch: Batch, parts: int) -> list[Batch]:
    """The batch cut into `parts` batches of whole pairs (sizes differ by at most one), each with
    its chosen and rejected rows, its own token count and cached reference values."""
    b = batch.num_pairs
    parts = max(1, min(parts, b))
    # A row's length: its last completion target is token n-1 of n+1 tokens (see collate).
    lengths = batch.mask.shape[1] - np.argmax(batch.mask[:, ::-1] > 0, axis=1) + 1
    out, start = [], 0
    for size in split_sizes(b, [1.0] * parts):
        rows = np.r_[start:start + size, b + start:b + start + size]
        ref = None if batch.ref_logps is None else batch.ref_logps[rows]
        hidden = None if batch.ref_hidden is None else [batch.ref_hidden[r] for r in rows]
        out.append(Batch(batch.inputs[rows], batch.targets[rows], batch.mask[rows], size,
                         int(lengths[rows].sum()), ref, hidden))
        start += size
    return out
