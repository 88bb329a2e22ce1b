"""Exp-heavy operations rebuilt for MLX's CPU backend, and the switch that puts them in a model.

On Linux, MLX's CPU `exp` runs at about 14 ns per float (its polynomial goes through `std::fma`,
which is a library call on the generic x86-64 build), so every softmax, sigmoid and log-sum-exp
of a training step is bound by it: the attention softmax, SwiGLU's sigmoid and the LM head's
log-partition over the vocabulary take close to half of a SmolLM2-135M step. Written with
multiplies, adds and one integer shift, the same Cephes polynomial becomes a handful of
elementwise kernels that `mx.compile` fuses and the C++ compiler vectorises: 2 instead of 14 ns
per float, as accurate as MLX's own exp (tests/test_cpu_kernels.py).

`installed(model)` points the model's module at the fast SwiGLU and attention for the duration of
mlx-dpo's own forward passes (and hence the traces `mx.compile` keeps), and switches
`logsumexp` here to the fast one; outside it, mlx-lm's own functions run untouched. It does
nothing on Metal, where `exp` is a native instruction.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys

import mlx.core as mx

_ACTIVE = contextvars.ContextVar("mlx_dpo_cpu_kernels", default=False)

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: adding then subtracting it rounds a float32 to an integer
_MASKED = -1e30  # a masked attention score: finite, so that the fast exp gives ~0 rather than NaN
# exp2 on [-0.5, 0.5]: Cephes' coefficients, highest power first.
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3,
              5.550332471162809e-2, 2.402264791363012e-1, 6.931472028550421e-1, 1.0)
# The same polynomial in g = -remainder (what the kernel computes): odd powers change sign.
_EXP2_POLY_NEG = tuple(coef * (-1) ** (6 - k) for k, coef in enumerate(_EXP2_POLY))


def _exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0; anything below -87 gives about 1e-38, not 0; NaN stays NaN.

    Written for MLX's fuser (at most 11 ops deep per kernel, a value used twice must be used
    within one kernel): 2**round(x*log2 e) is built from integer bits in one kernel, the
    polynomial in the remainder, evaluated by Estrin's scheme to stay shallow, in the other.
    Inputs must be finite or NaN: -inf gives NaN (callers clamp masks to -1e30).
    """
    # (2x) * (log2 e / 2) is x * log2 e bit for bit, but a distinct node: each kernel keeps its own.
    whole = ((x * 2.0) * (_LOG2E / 2) + _ROUND - _ROUND).astype(mx.int32)  # huge or NaN: INT_MIN or 0
    two_to_whole = (mx.maximum(whole, -126) + 127) << 23
    y = x * _LOG2E
    g = ((y + _ROUND) - _ROUND) - y  # minus the remainder, in [-0.5, 0.5]
    c = _EXP2_POLY_NEG
    g2 = g * g
    p = (c[5] * g + c[6]) + g2 * (c[3] * g + c[4]) + (g2 * g2) * ((c[1] * g + c[2]) + c[0] * g2)
    return p * two_to_whole.view(mx.float32)


@mx.custom_function
def exp_nonpositive(x: mx.array) -> mx.array:
    """Differentiable exp(x) for x <= 0: the caller subtracts a maximum first."""
    return _exp_nonpositive(x)


@exp_nonpositive.vjp
def _exp_nonpositive_vjp(primals, cotangent, output):
    return (cotangent * output,)


def _sigmoid(x: mx.array) -> mx.array:
    e = _exp_nonpositive(-mx.abs(x))  # exp(-|x|) never overflows
    return mx.where(x >= 0, 1.0, e) / (1.0 + e)


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's `activations.swiglu`."""
    return gate * _sigmoid(gate) * x


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    s = _sigmoid(gate)  # recomputed rather than kept: one (tokens, intermediate) array less
    silu = gate * s
    return cotangent * x * (s + silu * (1.0 - s)), cotangent * silu


@mx.custom_function
def _logsumexp_and_softmax(x: mx.array):
    top = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    e = _exp_nonpositive(x - top)
    total = e.sum(axis=-1, keepdims=True)
    return (top + mx.log(total)).squeeze(-1), e / total


@_logsumexp_and_softmax.vjp
def _logsumexp_vjp(primals, cotangents, outputs):
    # The softmax is an output of the forward, kept for this: the backward needs one array of
    # vocabulary width, not the logits plus a recomputed exp (measured: less peak memory, no exp).
    return (cotangents[0][..., None] * outputs[1],)


def logsumexp(x: mx.array) -> mx.array:
    """log-sum-exp over the last axis (float32 in): the fast one inside `installed`."""
    return _logsumexp_and_softmax(x)[0] if _ACTIVE.get() else mx.logsumexp(x, axis=-1)


def attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's `scaled_dot_product_attention`, with the softmax on the fast exp.

    Grouped-query heads share a key head through one reshape (no copy of the keys); masks are
    mlx-lm's: None, "causal", a boolean array (True = attend) or an additive float array.
    """
    if sinks is not None or hasattr(cache, "bits") or queries.dtype != mx.float32:
        from mlx_lm.models import base  # only a model's own module is ever patched, never base

        return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    b, heads, t, d = queries.shape
    kv_heads, s = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    scores = (queries * scale).reshape(b, kv_heads, group * t, d) @ keys.swapaxes(-1, -2)
    scores = scores.reshape(b, heads, t, s)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        mask = mx.arange(s)[None, :] <= mx.arange(t)[:, None] + (s - t)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, _MASKED)
        else:
            scores = scores + mx.maximum(mask.astype(scores.dtype), _MASKED)
    top = mx.stop_gradient(scores.max(axis=-1, keepdims=True))
    weights = exp_nonpositive(scores - top).reshape(b, kv_heads, group * t, s)
    out = (weights @ values) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(b, heads, t, d)


def _targets(model) -> list[tuple[object, str, object]]:
    """(module, name, replacement) for the names in the model's module that we speed up."""
    from mlx_lm.models import activations, base

    module = sys.modules.get(type(model).__module__)
    out = []
    if getattr(module, "swiglu", None) is activations.swiglu:
        out.append((module, "swiglu", swiglu))
    if getattr(module, "scaled_dot_product_attention", None) is base.scaled_dot_product_attention:
        out.append((module, "scaled_dot_product_attention", attention))
    return out


@contextlib.contextmanager
def installed(model, enabled: bool = True):
    """Within the block, `model`'s forward uses the fast SwiGLU, attention and log-sum-exp."""
    if not enabled or mx.default_device() != mx.cpu or _ACTIVE.get():
        yield
        return
    targets = _targets(model)
    saved = [(module, name, getattr(module, name)) for module, name, _ in targets]
    token = _ACTIVE.set(True)
    try:
        for module, name, fast in targets:
            setattr(module, name, fast)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        _ACTIVE.reset(token)
