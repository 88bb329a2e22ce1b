"""Target log-probs straight from hidden states: the LM head and its log-softmax in vocabulary
chunks, so that the (tokens x vocabulary) logits never exist whole.

A DPO step needs one number per completion token, log softmax(h W^T)[target], yet the plain
path writes the whole logits array and, around its log-softmax, several more of that size
(the max-shifted logits, the exp's intermediate, the exp, the backward's gradient). For
SmolLM2-135M's 49152-word vocabulary those are the largest arrays of a step, and for the
128k-152k vocabularies of Llama 3 or Qwen they dominate it.

Here the head runs over a few thousand rows of W at a time (`CHUNK_BYTES` of logits). Each
chunk keeps only its exp(logits - chunk max) for the backward, so one logits-sized array stays
alive, plus one chunk's temporaries; the chunks' maxima and sums combine into the log-partition as an online
softmax does. The backward makes each chunk's softmax from its kept exp and a per-row factor
exp(chunk max - log-partition) and accumulates the hidden states' gradient chunk by chunk
(`mx.addmm`, no zeroed temporaries). Chunks run along the vocabulary rather than the tokens:
every chunk's matmul reads a different slice of W, so OpenBLAS packs W once in all, where
token chunks would pack all of it again for each.

`mx.depends` makes each chunk wait for the previous one: MLX's wide evaluation (mlx-dpo sets
MLX_BFS_MAX_WIDTH high so that its CPU streams overlap) would otherwise run the chunks side by
side and keep all their temporaries at once.
"""
from __future__ import annotations

import math

import mlx.core as mx

from . import cpu_kernels, cpu_layers

CHUNK_BYTES = 4 * 2**20  # float32 logits per chunk (measured, see docs/benchmarks.md)
MIN_CHUNK = 1024  # rows of W: below this the chunk's matmuls get narrow


def _chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    """(first, stop) rows of W per chunk, for `rows` hidden states: about CHUNK_BYTES of logits
    each, the width a power of two (within 1.41x of the budget either way). The bounds are
    constants in the compiled elementwise kernels, and MLX's CPU backend builds a kernel with g++
    for each new constant: a width that followed `rows` exactly gave every new batch length its
    own kernels to build (tens of seconds per step on pairs of varied lengths)."""
    width = max(CHUNK_BYTES / (4 * max(rows, 1)), 1)
    width = max(2 ** round(math.log2(width)), MIN_CHUNK)
    return [(first, min(first + width, vocab)) for first in range(0, vocab, width)]


def _target_logits(logits: mx.array, targets: mx.array, first: int, stop: int) -> mx.array:
    """Each row's target logit (R,) from a chunk of words first..stop-1; 0 where the target is
    in another chunk, so that the chunks' results add up."""
    hit = (targets >= first) & (targets < stop)
    local = mx.clip(targets - first, 0, stop - first - 1)[:, None]
    return mx.where(hit, mx.take_along_axis(logits, local, axis=-1).squeeze(-1), 0.0)


def _exp(x: mx.array) -> mx.array:
    """exp of numbers <= 0: the fast CPU one inside mlx-dpo's kernels, MLX's own elsewhere."""
    return cpu_kernels.fast_exp_nonpositive(x) if cpu_kernels.active() else mx.exp(x)


def _softmax_parts(logits: mx.array):
    """(exp(logits - row max), row max, row sum): one C++ pass per row where native.py's kernels
    are built (inside mlx-dpo's CPU passes), else MLX ops on the fast exp."""
    kernels = cpu_layers.kernels_for(logits)
    if kernels is not None:
        shifted_exp, top, total = kernels.row_softmax(logits)
        return shifted_exp, mx.stop_gradient(top), total
    top = mx.stop_gradient(cpu_kernels.row_max(logits))
    shifted_exp = _exp(logits - top)
    return shifted_exp, top, cpu_kernels.row_sum(shifted_exp)


@mx.custom_function
def _head_logps(hidden: mx.array, weight: mx.array, targets: mx.array):
    """(log p(target) (R,), log-partition (R,), chunk maxima (R, chunks), then each chunk's
    exp(logits - chunk max)) for hidden (R, D), weight (V, D), targets (R,)."""
    picked = mx.zeros(targets.shape, dtype=mx.float32)
    tops, totals, kept = [], [], []
    for first, stop in _chunks(*targets.shape, weight.shape[0]):
        if kept:  # this chunk's logits are made once the last chunk's logits are used up
            hidden = mx.depends(hidden, [kept[-1], totals[-1], picked])
        logits = (hidden @ weight[first:stop].T).astype(mx.float32)
        shifted_exp, top, total = _softmax_parts(logits)
        picked = picked + _target_logits(logits, targets, first, stop)
        tops.append(top)
        totals.append(total)
        kept.append(shifted_exp)
    tops, totals = mx.concatenate(tops, axis=-1), mx.concatenate(totals, axis=-1)
    top = tops.max(axis=-1, keepdims=True)
    lse = (top + mx.log((totals * mx.exp(tops - top)).sum(axis=-1, keepdims=True))).squeeze(-1)
    return (picked - lse, lse, tops, *kept)


@_head_logps.vjp
def _head_logps_vjp(primals, cotangents, outputs):
    # d logp / d logits = onehot(target) - softmax and d lse / d logits = softmax, where a chunk's
    # softmax is its kept exp times exp(chunk max - lse): one fused pass per chunk.
    hidden, weight, targets = primals
    d_logp, d_lse = cotangents[:2]
    _, lse, tops, *kept = outputs
    factor = (d_lse - d_logp)[:, None] * mx.exp(tops - lse[:, None])  # (R, chunks)
    d_hidden, d_weight = None, []
    for c, (first, stop) in enumerate(_chunks(*targets.shape, weight.shape[0])):
        shifted_exp = kept[c] if d_hidden is None else mx.depends(kept[c], d_hidden)
        target = mx.arange(first, stop) == targets[:, None]
        d_logits = mx.where(target, d_logp[:, None], 0.0) + factor[:, c:c + 1] * shifted_exp
        w = weight[first:stop].astype(mx.float32)
        d_hidden = d_logits @ w if d_hidden is None else mx.addmm(d_hidden, d_logits, w)
        d_weight.append(d_logits.T @ hidden.astype(mx.float32))  # lazy: evaluated only when W is trained
    return (d_hidden.astype(hidden.dtype), mx.concatenate(d_weight, axis=0).astype(weight.dtype),
            mx.zeros_like(targets))


# Compiled on its own too, for the passes that run eagerly (the reference pass): each of the fast
# exp's ops would otherwise write a chunk-sized array. Only inside mlx-dpo's CPU kernels, whose exp
# a trace then holds; elsewhere the function runs as it is.
_compiled_head_logps = mx.compile(_head_logps)


def head_logps(hidden: mx.array, weight: mx.array, targets: mx.array) -> mx.array:
    """log softmax(hidden @ weight.T)[targets] over the vocabulary, float32 (...,), without the
    logits: hidden (..., D), weight (V, D), targets (...) int. The head's matmuls run in the
    weights' dtype, the log-softmax in float32 (as token_logps does after an fp16 head)."""
    shape = targets.shape
    fn = _compiled_head_logps if cpu_kernels.active() else _head_logps
    out = fn(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).astype(mx.int32))
    return out[0].reshape(shape)


def _head_eval(hidden_p: mx.array, weight_p: mx.array, hidden_q: mx.array, weight_q: mx.array,
               targets: mx.array):
    """(log p(target), log q(target), KL(p || q)) per row (R,) of two heads over the same
    vocabulary, in one pass over its chunks: running maxima m, sums s = sum exp(l - m) and, for
    the KL, t = sum exp(l_p - m_p) (l_p - l_q), rescaled whenever a maximum grows; then
    KL = t / s_p - lse_p + lse_q (E_p[l_p - l_q] minus the two log-partitions)."""
    rows = (targets.shape[0], 1)
    picked_p = picked_q = mx.zeros(targets.shape, dtype=mx.float32)
    sum_p, sum_q, kl_num = (mx.zeros(rows, dtype=mx.float32) for _ in range(3))
    top_p = top_q = mx.full(rows, -mx.inf, dtype=mx.float32)  # the first rescale is exp(-inf) = 0
    for first, stop in _chunks(*targets.shape, weight_p.shape[0]):
        if first:  # one chunk's logits at a time
            hidden_p = mx.depends(hidden_p, [sum_p, sum_q, kl_num, picked_p, picked_q])
        l_p = (hidden_p @ weight_p[first:stop].T).astype(mx.float32)
        l_q = (hidden_q @ weight_q[first:stop].T).astype(mx.float32)
        picked_p = picked_p + _target_logits(l_p, targets, first, stop)
        picked_q = picked_q + _target_logits(l_q, targets, first, stop)
        new_p = mx.maximum(cpu_kernels.row_max(l_p), top_p)
        new_q = mx.maximum(cpu_kernels.row_max(l_q), top_q)
        shrink_p, shrink_q = mx.exp(top_p - new_p), mx.exp(top_q - new_q)
        e_p = _exp(l_p - new_p)
        sum_p = sum_p * shrink_p + cpu_kernels.row_sum(e_p)
        sum_q = sum_q * shrink_q + cpu_kernels.row_sum(_exp(l_q - new_q))
        kl_num = kl_num * shrink_p + cpu_kernels.row_sum(e_p * (l_p - l_q))
        top_p, top_q = new_p, new_q
    lse_p, lse_q = top_p + mx.log(sum_p), top_q + mx.log(sum_q)
    kl = kl_num / sum_p - lse_p + lse_q
    return picked_p - lse_p.squeeze(-1), picked_q - lse_q.squeeze(-1), kl.squeeze(-1)


_compiled_head_eval = mx.compile(_head_eval)


def head_eval(hidden_p: mx.array, weight_p: mx.array, hidden_q: mx.array, weight_q: mx.array,
              targets: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """For evaluation, without either head's logits: (log p(target), log q(target), exact
    KL(p || q) over the vocabulary) at every position (...,), float32, where p and q are the
    log-softmaxes of hidden_p @ weight_p.T and hidden_q @ weight_q.T (hidden (..., D), weights
    (V, D)). No gradients."""
    shape = targets.shape
    fn = _compiled_head_eval if cpu_kernels.active() else _head_eval
    flat = [mx.stop_gradient(a) for a in (hidden_p.reshape(-1, hidden_p.shape[-1]), weight_p,
                                          hidden_q.reshape(-1, hidden_q.shape[-1]), weight_q)]
    return tuple(out.reshape(shape) for out in fn(*flat, targets.reshape(-1).astype(mx.int32)))
