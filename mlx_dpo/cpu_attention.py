"""Attention for MLX's CPU backend: all of it in mlx-dpo's C++ kernel where that is built, else
causal query blocks on MLX ops.

mlx-lm's attention scores every query against every key, masked ones included, and autodiff
keeps each layer's (queries x keys) softmax for the backward, so its memory and memory traffic
grow with the square of the length.

Where native.py's kernels are built (Linux with a compiler) and the head size is 32, 64 or 128,
`_native_attention` runs causal and shared-prompt attention in C++ (csrc/causal_attention.cpp):
each block of 18 query rows is scored only against the keys its rows see, in register tiles; its
softmax and normalisation happen on the tiles, and its output is made there. The backward
recomputes the weights from the queries, the keys and two numbers per row, as flash attention
does, so nothing (queries x keys) outlives a block. A shared-prompt row (completion.py) is one call:
the rejected rows see the prompt's keys and their own. On the bench's LoRA step it took a step from
3.06-3.27 to 2.34-2.51 s at 256 tokens and from 12.0 to 9.0 s at 1024, with 0.25 and 2.1 GB less
peak memory (docs/benchmarks.md, session 11).

Without it (or for other head sizes), `blocked_attention` takes the queries in blocks of
`compute.attention_block` rows; a block is scored only against the keys it can see (its causal
prefix: the masked upper triangle is never computed) and keeps only its output and each row's
log-sum-exp. The backward recomputes a block's probabilities from those; no online softmax is
needed because a block's whole prefix fits in memory at these lengths.

The recomputation costs a matmul and an exp per block, which the saved traffic pays for only
on long sequences: on a LoRA step of SmolLM2-135M on 2 cores, blocks of 256 rows were within
run-to-run noise of dense attention at 1024 tokens and 1.15x faster (and 1 GB lighter) at 2048
(docs/benchmarks.md). So layers whose score matrix is smaller than `BLOCKED_FROM` keep their
softmax: in the same blocks of query rows (`kept_blocks_attention`, which skips the masked upper
triangle too) when there is more than one, else dense; compute.recompute_attention recomputes
at every length, for memory. The backward waits for its cotangent before recomputing
(`recompute.after`): without that, MLX's wide evaluation ran the recomputation during the forward
and kept it, which saved nothing.

Where the softmax is kept and the C++ attention does not apply (another head size), its forward
and the backward's pass over the scores still run in native.py's row kernel: one pass per row over
the keys the row sees, no mask array, no select. The recomputing blocks stay on MLX ops: with that
kernel there, a chain of layers kept score-sized arrays alive until the backward
(tests/test_recompute.py's measure), which is what they exist to avoid.

Masks: mlx-lm's "causal", a `CausalMask` (causal with left padding, kept symbolic so that each
block builds only its own slice of it), or a `SharedPromptMask` (completion.py's one row per
pair: one C++ call, or two causal attentions).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .cpu_kernels import (MASKED, attention_block, exp_nonpositive, fast_exp_nonpositive, recompute_attention, row_max,
                          row_sum)
from . import native
from .recompute import after

BLOCKED_FROM = 1024 * 1024  # queries x keys of a layer from which blocks pay (measured, see above)
NATIVE_HEAD_SIZES = (32, 64, 128)  # what native.py's causal attention is built for
NO_SPLIT = 2**30  # native.py's causal attention without a shared prompt's second part
ROW_ALIGN = 16  # causal attention's key axis is padded to a multiple of this (see _aligned)


@dataclass(frozen=True)
class CausalMask:
    """Query i of t sees key j of offset + t when left_pad[row] <= j <= offset + i; a query that
    would see nothing (a prompt's left pad) sees itself, so that no softmax row is empty."""
    offset: int
    left_pad: Optional[mx.array] = None  # (rows,) int32 pads before each row's first token

    def keep(self, first: int, stop: int, keys: int) -> mx.array:
        """Boolean (1 or rows, 1, stop - first, keys): which keys queries first..stop-1 see."""
        query = mx.arange(first, stop)[:, None] + self.offset
        key = mx.arange(keys)[None, :]
        keep = key <= query
        if self.left_pad is None:
            return keep[None, None]
        return _without_pads(keep, query, key, self.left_pad)

    def array(self, queries: int) -> mx.array:
        return self.keep(0, queries, self.offset + queries)


@dataclass(frozen=True)
class SharedPromptMask:
    """A shared-prompt row, [prompt | chosen | rejected] (completion.py): prompt and chosen
    queries see their causal prefix; rejected queries (from column `split` on) see the first
    `prompt` columns and their own causal prefix, never the chosen columns; left pads are never
    seen. It is two causal attentions side by side, and is computed as such."""
    prompt: int
    split: int
    left_pad: mx.array  # (rows,) int32 pads before each row's prompt

    def array(self, t: int) -> mx.array:
        """Boolean (rows, 1, t, t), for attentions that take a mask array."""
        query = mx.arange(t)[:, None]
        key = mx.arange(t)[None, :]
        keep = (key <= query) & ((key < self.prompt) | (key >= self.split) | (query < self.split))
        return _without_pads(keep, query, key, self.left_pad)


def _without_pads(keep: mx.array, query: mx.array, key: mx.array, left_pad: mx.array) -> mx.array:
    """(rows, 1, queries, keys): `keep` minus each row's left-pad keys; a query that would then see
    nothing (a pad itself) sees itself, so that no softmax row is empty."""
    return ((keep & (key >= left_pad[:, None, None])) | (key == query))[:, None]


def _grouped(x: mx.array, kv_heads: int) -> mx.array:
    """(b, heads, t, n) -> (b, kv_heads, group * t, n): the heads sharing a key head, stacked."""
    b, heads, t, n = x.shape
    return x.reshape(b, kv_heads, heads // kv_heads * t, n)


def _raw_scores(q_scaled: mx.array, keys: mx.array) -> mx.array:
    """Unmasked scores (b, heads, t, keys) of already-scaled queries (b, heads, t, d)."""
    b, heads, t, _ = q_scaled.shape
    return (_grouped(q_scaled, keys.shape[1]) @ keys.swapaxes(-1, -2)).reshape(b, heads, t, keys.shape[2])


def _scores(q_scaled: mx.array, keys: mx.array, keep: mx.array) -> mx.array:
    """Scores with the keys outside `keep` at MASKED."""
    return mx.where(keep, _raw_scores(q_scaled, keys), MASKED)


def _times_values(weights: mx.array, values: mx.array) -> mx.array:
    b, heads, t, _ = weights.shape
    return (_grouped(weights, values.shape[1]) @ values).reshape(b, heads, t, values.shape[-1])


def _aligned(keys: mx.array, values: mx.array):
    """Keys and values zero-padded to a multiple of ROW_ALIGN along the key axis: a causal mask
    never shows the extra keys (they come after every query), and score rows of whole lanes are
    what `row_max` vectorises (the shared-prompt parts have arbitrary lengths)."""
    extra = -keys.shape[2] % ROW_ALIGN
    if not extra:
        return keys, values
    pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
    return mx.pad(keys, pad), mx.pad(values, pad)


def _blocks(mask: CausalMask, queries: int, block: int, keys: int):
    """(first, stop, keys seen) of each query block, keys seen rounded up to ROW_ALIGN."""
    for first in range(0, queries, block):
        stop = min(first + block, queries)
        yield first, stop, min(-(-(mask.offset + stop) // ROW_ALIGN) * ROW_ALIGN, keys)


def _make_blocked(scale: float, offset: int, block: int, padded: bool):
    """A differentiable attention for one mask shape; left_pad is an input, not a constant, so
    that a compiled step stays valid for other batches of the same shape."""

    @mx.custom_function
    def attend(q, k, v, *left_pad):
        mask = CausalMask(offset, left_pad[0] if padded else None)
        q = q * scale
        outs, lses = [], []
        for first, stop, seen in _blocks(mask, q.shape[2], block, k.shape[2]):
            scores = _scores(q[:, :, first:stop], k[:, :, :seen], mask.keep(first, stop, seen))
            top = mx.stop_gradient(row_max(scores))
            weights = fast_exp_nonpositive(scores - top)
            total = row_sum(weights)
            outs.append(_times_values(weights, v[:, :, :seen]) / total)
            lses.append(top + mx.log(total))
        return mx.concatenate(outs, axis=2), mx.concatenate(lses, axis=2)

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        q, k, v, *left_pad = primals
        mask = CausalMask(offset, left_pad[0] if padded else None)
        d_out, (out, lse) = cotangents[0], outputs
        q, k = after([q, k], d_out)  # else MLX may recompute the scores during the forward and keep them
        q = q * scale
        keys = k.shape[2]
        row_dot = (d_out * out).sum(axis=-1, keepdims=True)
        d_q, d_k, d_v = [], mx.zeros_like(k), mx.zeros_like(v)
        for first, stop, seen in _blocks(mask, q.shape[2], block, k.shape[2]):
            k_seen = k[:, :, :seen]
            scores = _scores(q[:, :, first:stop], k_seen, mask.keep(first, stop, seen))
            probs = fast_exp_nonpositive(scores - lse[:, :, first:stop])
            dq, dk, dv = _softmax_attention_grads(probs, d_out[:, :, first:stop], row_dot[:, :, first:stop],
                                                  q[:, :, first:stop], k_seen, v[:, :, :seen])
            d_q.append(dq * scale)
            pad = [(0, 0), (0, 0), (0, keys - seen), (0, 0)]
            d_k, d_v = d_k + mx.pad(dk, pad), d_v + mx.pad(dv, pad)
        return (mx.concatenate(d_q, axis=2), d_k, d_v, *(mx.zeros_like(p) for p in left_pad))

    return attend


def blocked_attention(queries, keys, values, scale: float, mask: CausalMask, block: int) -> mx.array:
    """Causal attention (b, heads, t, d) over keys/values (b, kv_heads, mask.offset + t, d)."""
    padded = mask.left_pad is not None
    attend = _make_blocked(scale, mask.offset, min(block, queries.shape[2]), padded)
    out, _ = attend(queries, keys, values, *([mask.left_pad] if padded else []))
    return out


@mx.custom_function
def _dense(q_scaled, k, v, keep):
    """Softmax attention under a boolean mask; returns the output and, for the backward, the
    unnormalised weights and their row sums."""
    weights = fast_exp_nonpositive(_stable(_scores(q_scaled, k, keep)))
    total = row_sum(weights)
    return _times_values(weights, v) / total, weights, total


def _dense_vjp(primals, cotangents, outputs, offset: Optional[int] = None):
    # With P = W / l: dS = P * (dO V^T - rowsum(dO * O)), and rowsum(dO * O) is (t x d) work where
    # autodiff's rowsum(dP * P) is (t x keys). Folding 1/l into dO leaves one fused pass over the
    # scores (masked weights are exactly 0, so no mask is needed either); autodiff takes three to
    # four, through the divide, the exp and the where. With an offset (the fused version, whose
    # last primal is the left pads) that pass is native.py's and touches only the visible keys.
    q_scaled, k, v, mask_input = primals  # the boolean mask, or the fused version's left pads
    d_out, (out, weights, total) = cotangents[0], outputs
    d_out_scaled = d_out / total
    row_dot = (d_out_scaled * out).sum(axis=-1, keepdims=True)
    d_weights = _d_weights(d_out_scaled, v)
    if offset is None:
        d_scores = weights * (d_weights - row_dot)
    else:
        d_scores = native.kernels().causal_softmax_grad(weights, d_weights, row_dot, mask_input, offset)
    return (*_attention_products(weights, d_scores, d_out_scaled, q_scaled, k), mx.zeros_like(mask_input))


_dense.vjp(_dense_vjp)


def _dense_causal(q_scaled, k, v, mask: CausalMask, first: int, stop: int) -> mx.array:
    """`_dense` for queries first..stop-1 under a causal mask: its softmax in native.py's kernel
    when that is built (no mask array, no select), else `_dense` itself."""
    if native.kernels() is None:
        return _dense(q_scaled, k, v, mask.keep(first, stop, k.shape[2]))[0]
    return _fused_dense(mask.offset + first)(q_scaled, k, v, _left_pads(mask, q_scaled.shape[0]))[0]


def _native_applies(queries: mx.array) -> bool:
    return native.kernels() is not None and queries.shape[-1] in NATIVE_HEAD_SIZES


@functools.lru_cache(maxsize=None)
def _native_attention(offset: int, prompt: int = NO_SPLIT, split: int = NO_SPLIT):
    """Attention under native.py's causal (or, with `split`, shared-prompt) mask, forward and
    backward in C++; nothing but the output and two numbers per row kept for the backward."""
    mask = (offset, prompt, split)

    @mx.custom_function
    def attend(q_scaled, k, v, left_pad):
        return native.kernels().causal_attention(q_scaled, k, v, left_pad, *mask)  # (out, row max, row sum)

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        q_scaled, k, v, left_pad = primals
        grads = native.kernels().causal_attention_grad(q_scaled, k, v, *outputs, cotangents[0], left_pad, *mask)
        return (*grads, mx.zeros_like(left_pad))

    return attend


@functools.lru_cache(maxsize=None)
def _fused_dense(offset: int):
    @mx.custom_function
    def dense(q_scaled, k, v, left_pad):
        weights, _, total = native.kernels().causal_softmax(_raw_scores(q_scaled, k), left_pad, offset)
        return _times_values(weights, v) / total, weights, total

    dense.vjp(functools.partial(_dense_vjp, offset=offset))
    return dense


def _softmax_attention_grads(probs, d_out, row_dot, q, k, v):
    """Gradients of out = probs @ v with probs = softmax(q k^T) for queries q (b, heads, t, d)
    against keys and values (b, kv_heads, keys, d): dS = P * (dO V^T - rowsum(dO * O)), then the
    three products. Returns (d_q (b, heads, t, d), d_k, d_v (b, kv_heads, keys, d)): the blocked
    attention's backward, from its recomputed probabilities."""
    return _attention_products(probs, probs * (_d_weights(d_out, v) - row_dot), d_out, q, k)


def _d_weights(d_out, v):
    """dO V^T (b, heads, t, keys): the gradient of the attention weights."""
    b, heads, t, _ = d_out.shape
    return (_grouped(d_out, v.shape[1]) @ v.swapaxes(-1, -2)).reshape(b, heads, t, v.shape[2])


def _attention_products(probs, d_scores, d_out, q, k):
    """(dQ = dS K, dK = dS^T Q, dV = P^T dO) for probs and d_scores (b, heads, t, keys)."""
    kv_heads = k.shape[1]
    probs, d_scores, d_out = _grouped(probs, kv_heads), _grouped(d_scores, kv_heads), _grouped(d_out, kv_heads)
    d_q = (d_scores @ k).reshape(q.shape)
    return d_q, d_scores.swapaxes(-1, -2) @ _grouped(q, kv_heads), probs.swapaxes(-1, -2) @ d_out


def _left_pads(mask: CausalMask, rows: int) -> mx.array:
    return mask.left_pad if mask.left_pad is not None else mx.zeros((rows,), dtype=mx.int32)


def _stable(scores: mx.array) -> mx.array:
    """Scores minus each row's maximum, so that every exp is of a number <= 0."""
    return scores - mx.stop_gradient(row_max(scores))


def dense_attention(queries, keys, values, scale: float, mask) -> mx.array:
    """All scores at once, the unnormalised softmax kept for the backward: short sequences and
    non-causal masks."""
    if mask is not None and mask.dtype == mx.bool_:
        return _dense(queries * scale, keys, values, mask)[0]
    scores = _raw_scores(queries * scale, keys)
    if mask is not None:  # additive: clamped so that -inf stays finite for the fast exp
        scores = scores + mx.maximum(mask.astype(queries.dtype), MASKED)
    weights = exp_nonpositive(_stable(scores))
    return _times_values(weights, values) / row_sum(weights)


def attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's `scaled_dot_product_attention` for the CPU: blocked for large causal masks, dense
    otherwise; what this does not cover (sinks, quantized caches, half precision) goes to
    mlx-lm's own function."""
    t, s = queries.shape[2], keys.shape[2]
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        mask = CausalMask(s - t)
    if sinks is not None or hasattr(cache, "bits") or queries.dtype != mx.float32:
        from mlx_lm.models import base  # only a model's own module is ever patched, never base

        if isinstance(mask, (CausalMask, SharedPromptMask)):
            mask = mask.array(t)
        return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    if isinstance(mask, SharedPromptMask):
        return _shared_prompt_attention(queries, keys, values, cache, scale, mask)
    if not isinstance(mask, CausalMask):
        return dense_attention(queries, keys, values, scale, mask)
    if _native_applies(queries):  # all of it in C++, nothing (queries x keys) kept: no blocks needed
        return _native_attention(mask.offset)(queries * scale, keys, values, _left_pads(mask, queries.shape[0]))[0]
    keys, values = _aligned(keys, values)
    block = attention_block()
    if block and (t * s >= BLOCKED_FROM or recompute_attention()):
        return blocked_attention(queries, keys, values, scale, mask, block)
    return kept_blocks_attention(queries, keys, values, scale, mask, block)


def kept_blocks_attention(queries, keys, values, scale: float, mask: CausalMask, block: int) -> mx.array:
    """Causal attention in blocks of `block` query rows (0: one block), each dense against the keys
    it can see, its unnormalised softmax kept for the backward: the masked upper triangle is
    skipped and nothing is recomputed. At 1024 tokens it pays for its extra slices and copies
    (a LoRA step 12.6-13.1 against 13.6-14.0 s, 0.8 GB less); at 256, one block is all there is."""
    t = queries.shape[2]
    q = queries * scale
    if not block or t <= block:
        return _dense_causal(q, keys, values, mask, 0, t)
    return mx.concatenate([_dense_causal(q[:, :, first:stop], keys[:, :, :seen], values[:, :, :seen], mask, first, stop)
                           for first, stop, seen in _blocks(mask, t, block, keys.shape[2])], axis=2)


def _shared_prompt_attention(queries, keys, values, cache, scale: float, mask: SharedPromptMask) -> mx.array:
    """The prompt and chosen columns attend causally among themselves; the rejected columns attend
    to the prompt's keys and their own, causally after the prompt: each part as `attention` does
    it (dense or blocked), so no score between rejected and chosen tokens is ever computed."""
    s, p = mask.split, mask.prompt
    if _native_applies(queries):
        return _native_attention(0, p, s)(queries * scale, keys, values, mask.left_pad)[0]
    first = attention(queries[:, :, :s], keys[:, :, :s], values[:, :, :s], cache, scale,
                      CausalMask(0, mask.left_pad))
    rejected_keys = mx.concatenate([keys[:, :, :p], keys[:, :, s:]], axis=2)
    rejected_values = mx.concatenate([values[:, :, :p], values[:, :, s:]], axis=2)
    second = attention(queries[:, :, s:], rejected_keys, rejected_values, cache, scale,
                       CausalMask(p, mask.left_pad))
    return mx.concatenate([first, second], axis=2)
