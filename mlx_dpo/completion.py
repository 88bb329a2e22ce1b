"""Logits at completion positions only: the DPO hot path without the wasted work.

The plain path runs the LM head and a vocabulary-wide log-softmax at every position of the
(2B, T) batch, prompt and padding included, although only completion tokens count. Here the
transformer body runs as usual, the hidden states of completion positions are gathered into
a (2B, C) grid, and only those reach the head: C is the longest completion, not T.

With `shared=True` the prompt also runs once per pair instead of twice: the B prompts go
through the body left-padded, their keys/values are copied to the chosen and the rejected
rows, and the 2B completions run on top of that prefix. RoPE scores depend only on position
differences, so the left-padding shift changes nothing; pads are masked out of attention.

A `Plan` is built on the host from the numpy batch (cheap index arithmetic) and feeds
`completion_logits`; its `targets` and `weights` replace the batch's targets and mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from . import cpu_kernels
from .cpu_attention import CausalMask
from .data.batching import Batch

PAD_MULTIPLE = 16  # grid widths are rounded up: fewer distinct shapes, fewer mx.compile traces


@dataclass
class Plan:
    """Index arrays for one batch; shapes in the field comments (N = 2B rows)."""
    inputs: Optional[np.ndarray]  # packed: (N, T) int32, the batch's inputs
    flat_index: Optional[np.ndarray]  # packed: (N, C) int32 into the flattened (N*T) hidden states
    targets: np.ndarray  # (N, C) int32 completion tokens
    weights: np.ndarray  # (N, C) float32, 1 on real completion tokens
    prompts: Optional[np.ndarray] = None  # shared: (B, P) int32, left-padded
    left_pad: Optional[np.ndarray] = None  # shared: (B,) int32 pads before each prompt
    continuation: Optional[np.ndarray] = None  # shared: (N, C-1) int32 completion inputs

    @property
    def shared(self) -> bool:
        return self.prompts is not None

    def arrays(self) -> tuple:
        """The plan as MLX arrays, in `completion_logits`'s argument order."""
        if self.shared:
            parts = (self.prompts, self.left_pad, self.continuation)
        else:
            parts = (self.inputs, self.flat_index)
        return tuple(mx.array(p) for p in parts)


def _round_up(n: int) -> int:
    return max(-(-n // PAD_MULTIPLE) * PAD_MULTIPLE, PAD_MULTIPLE)


def _spans(mask: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(first target index, count) of each row's completion; None unless every row's
    completion is one contiguous run (what collate makes)."""
    on = mask > 0
    counts = on.sum(axis=1)
    starts = on.argmax(axis=1)
    cols = np.arange(mask.shape[1])[None, :]
    contiguous = (on == ((cols >= starts[:, None]) & (cols < (starts + counts)[:, None]))).all()
    if not contiguous or (counts == 0).any():
        return None
    return starts, counts


def packed_plan(batch: Batch) -> Optional[Plan]:
    spans = _spans(batch.mask)
    if spans is None:
        return None
    starts, counts = spans
    n, t = batch.mask.shape
    width = _round_up(int(counts.max()))
    cols = np.arange(width)[None, :]
    valid = cols < counts[:, None]
    pos = np.minimum(np.where(valid, starts[:, None] + cols, starts[:, None]), t - 1)
    rows = np.arange(n)[:, None]
    return Plan(batch.inputs, (rows * t + pos).astype(np.int32), batch.targets[rows, pos].astype(np.int32),
                valid.astype(np.float32))


def shared_plan(batch: Batch) -> Optional[Plan]:
    """None when the chosen and rejected rows of a pair do not start with the same prompt."""
    spans = _spans(batch.mask)
    if spans is None:
        return None
    starts, counts = spans
    b = batch.num_pairs
    plen = starts + 1  # target t is token t+1: the first completion target sits at len(prompt)-1
    if not (plen[:b] == plen[b:]).all():
        return None
    for r in range(b):
        if not np.array_equal(batch.inputs[r, :plen[r]], batch.inputs[r + b, :plen[r]]):
            return None
    width = _round_up(int(counts.max()))
    cols = np.arange(width)[None, :]
    valid = cols < counts[:, None]
    src = np.minimum(starts[:, None] + cols, batch.targets.shape[1] - 1)
    targets = np.where(valid, batch.targets[np.arange(2 * b)[:, None], src], 0).astype(np.int32)
    p_width = _round_up(int(plen[:b].max()))
    prompts = np.zeros((b, p_width), dtype=np.int32)
    for r in range(b):
        prompts[r, p_width - plen[r]:] = batch.inputs[r, :plen[r]]
    # The last completion token is never an input: it is only predicted.
    return Plan(None, None, targets, valid.astype(np.float32), prompts,
                (p_width - plen[:b]).astype(np.int32), targets[:, :-1].copy())


def make_plan(batch: Batch, shared: bool) -> Optional[Plan]:
    return (shared_plan(batch) if shared else None) or packed_plan(batch)


# -- MLX side ---------------------------------------------------------------------------------
def split_model(model):
    """(body, head): body(inputs, cache) -> hidden states, head(hidden) -> logits; None for an
    architecture whose top is not the plain `model.model` + LM head that this relies on."""
    body = getattr(model, "model", None)
    if body is None or not callable(body):
        return None
    if getattr(model, "lm_head", None) is not None:
        return body, model.lm_head
    embed = getattr(body, "embed_tokens", None)
    if embed is not None and hasattr(embed, "as_linear"):
        return body, embed.as_linear
    return None


def completion_logits(model, shared: bool, arrays: tuple) -> mx.array:
    """Logits (N, C, V) at the positions that predict the plan's targets; `arrays` is
    `plan.arrays()` and `shared` is `plan.shared`."""
    body, head = split_model(model)
    if shared:
        return head(_shared_hidden(body, *arrays))
    return head(_gathered_hidden(body, *arrays))


def _gathered_hidden(body, inputs: mx.array, flat_index: mx.array) -> mx.array:
    hidden = body(inputs)
    return hidden.reshape(-1, hidden.shape[-1])[flat_index]


def _shared_hidden(body, prompts: mx.array, left_pad: mx.array, continuation: mx.array) -> mx.array:
    caches = [_PrefixCache(left_pad) for _ in body.layers]
    prompt_hidden = body(prompts, cache=caches)
    for cache in caches:
        cache.fork(prompts.shape[1])
    # Left padding puts every prompt's last token in the last column.
    last = mx.concatenate([prompt_hidden[:, -1:]] * 2, axis=0)
    return mx.concatenate([last, body(continuation, cache=caches)], axis=1)


class _PrefixCache:
    """Enough of mlx-lm's KV-cache interface to run a shared prompt, then its continuations.

    Phase 1 (prompts, B rows): offset 0, keys kept. fork(): keys copied to 2B rows (chosen
    block, then rejected block) and offset set to the prompt width. Phase 2: continuation
    keys are appended. Unlike a generation cache it keeps the graph, so gradients flow
    back into the prompt's keys and values.
    """

    def __init__(self, left_pad: mx.array):
        self.left_pad = left_pad
        self.keys = self.values = None
        self.offset = 0

    def fork(self, width: int) -> None:
        self.keys = mx.concatenate([self.keys] * 2, axis=0)
        self.values = mx.concatenate([self.values] * 2, axis=0)
        self.left_pad = mx.concatenate([self.left_pad] * 2, axis=0)
        self.offset = width

    def update_and_fetch(self, keys, values):
        if self.offset == 0:
            self.keys, self.values = keys, values
            return keys, values
        return (mx.concatenate([self.keys, keys], axis=2),
                mx.concatenate([self.values, values], axis=2))

    def make_mask(self, n: int, return_array: bool = False, window_size=None) -> mx.array:
        if window_size is not None:
            from .errors import UserError
            raise UserError("training.share_prompt does not support models with sliding-window attention; "
                            "set training.share_prompt: false for this model")
        if cpu_kernels.attention_block():
            return CausalMask(self.offset, self.left_pad)  # built block by block where it is used
        q = mx.arange(n)[:, None]
        k = mx.arange(self.offset + n)[None, :]
        causal = k <= q + self.offset
        real = k >= self.left_pad[:, None, None]  # (rows, 1, keys): pads are never attended
        mask = causal & real
        if self.offset == 0:
            # A pad query would see no key at all (a NaN softmax row): let it see itself.
            mask = mask | (k == q)
        return mask[:, None]
