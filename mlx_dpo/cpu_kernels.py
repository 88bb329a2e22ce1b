"""Exp-heavy operations rebuilt for MLX's CPU backend, and the switch that puts them in a model.

On Linux, MLX's CPU `exp` runs at 11-13 ns per float (its polynomial goes through `std::fma`,
which is a library call on the generic x86-64 build), so every softmax, sigmoid and log-softmax
of a training step is bound by it: the attention softmax, SwiGLU's sigmoid and the LM head's
log-partition over the vocabulary take close to half of a SmolLM2-135M step. Written with
multiplies, adds and one integer shift, the same Cephes polynomial becomes a handful of
elementwise kernels that `mx.compile` fuses and the C++ compiler vectorises: 1.2-2.6 instead of
11.1-11.7 ns per float in a step's reused buffers (scripts/bench_cpu_ops.py, runs of one day on
a shared machine), as accurate as MLX's own exp (tests/test_cpu_kernels.py). The target
log-probs get their own VJP on top of it.

`installed(model)` points the model's module at the fast SwiGLU and attention (cpu_attention.py,
built on this exp) for the duration of mlx-dpo's own forward passes (and hence the traces
`mx.compile` keeps), and switches `target_logps` here to the fast one; outside it, mlx-lm's own
functions run untouched. It does nothing on Metal, where `exp` is a native instruction.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Optional

import mlx.core as mx

from . import cpu_layers

_ACTIVE = contextvars.ContextVar("mlx_dpo_cpu_kernels", default=False)
# While the model's attention is ours: its query block (0 = none), and masks may stay symbolic.
_ATTENTION = contextvars.ContextVar("mlx_dpo_cpu_attention", default=None)
# What the backward recomputes rather than keeps: (SwiGLU product, attention's softmax at every
# length), from compute.recompute_activations and compute.recompute_attention.
_RECOMPUTE = contextvars.ContextVar("mlx_dpo_cpu_recompute", default=(False, False))

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: adding then subtracting it rounds a float32 to an integer
MASKED = -1e30  # a masked attention score: finite, so that the fast exp gives ~0 rather than NaN
# exp2 on [-0.5, 0.5]: Cephes' coefficients, highest power first.
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3,
              5.550332471162809e-2, 2.402264791363012e-1, 6.931472028550421e-1, 1.0)
# The same polynomial in g = -remainder (what the kernel computes): odd powers change sign.
_EXP2_POLY_NEG = tuple(coef * (-1) ** (6 - k) for k, coef in enumerate(_EXP2_POLY))


def fast_exp_nonpositive(x: mx.array, again: Optional[mx.array] = None) -> mx.array:
    """exp(x) for x <= 0; exactly 0 below about -87.7 (float32's smallest normal power of two);
    NaN stays NaN.

    Written for MLX's fuser (at most 11 ops deep per kernel, a value used twice must be used
    within one kernel): 2**round(x*log2 e) is built from integer bits in one kernel, the
    polynomial in the remainder, evaluated by Estrin's scheme to stay shallow, in the other.
    `again`, when given, holds the same numbers as x computed by other ops: each kernel then
    computes its own copy of x rather than MLX writing x to memory for both. That pays when x
    comes from arrays of its own shape (SwiGLU's sigmoid: 4.33 -> 3.78 ns per float, scratch timing); not for
    `scores - row maximum`, where the broadcast maximum would turn both contiguous kernels into
    strided ones (measured 3.4 -> 4.4 ns per float).
    Inputs must be finite or NaN: -inf gives NaN (callers clamp masks to -1e30).
    """
    # (2x) * (log2 e / 2) is x * log2 e bit for bit, but a distinct node: each kernel keeps its own.
    whole = ((x * 2.0) * (_LOG2E / 2) + _ROUND - _ROUND).astype(mx.int32)  # huge or NaN: INT_MIN or 0
    x = x if again is None else again
    # Below 2**-126 the exponent field is 0, so the factor is +0.0: a masked score's probability is
    # exactly 0, not a denormal. Denormals are slow on many x86 CPUs, and the backward multiplies
    # them by small gradients into more of them (measured: a DPO step 2-4x slower).
    two_to_whole = (mx.maximum(whole, -127) + 127) << 23
    y = x * _LOG2E
    g = ((y + _ROUND) - _ROUND) - y  # minus the remainder, in [-0.5, 0.5]
    c = _EXP2_POLY_NEG
    g2 = g * g
    p = (c[5] * g + c[6]) + g2 * (c[3] * g + c[4]) + (g2 * g2) * ((c[1] * g + c[2]) + c[0] * g2)
    return p * two_to_whole.view(mx.float32)


def row_max(x: mx.array) -> mx.array:
    """x.max(axis=-1, keepdims=True), the same numbers, several times faster on MLX's CPU backend.

    MLX reduces a contiguous last axis one element at a time; viewed as (n / lanes, lanes), the
    first max runs down a strided axis with `lanes` contiguous accumulators, which the compiler
    vectorises (scripts/bench_cpu_ops.py: rows of 1240 attention scores 1.0-1.7 -> 0.5-1.1 ns per
    float, vocabulary rows of 49152 1.1-1.8 -> 0.22-0.46; ranges over one day's runs). A maximum
    does not depend on the order it is taken in."""
    return _by_lanes(x, "max")


def row_sum(x: mx.array) -> mx.array:
    """x.sum(axis=-1, keepdims=True) by the same lanes as `row_max` (scripts/bench_cpu_ops.py):
    `lanes` partial sums, then their sum, which rounds differently from MLX's one running sum and
    no worse (its error grows with n / lanes rather than n)."""
    return _by_lanes(x, "sum")


def _by_lanes(x: mx.array, op: str) -> mx.array:
    n = x.shape[-1]
    for lanes in (32, 16, 8):
        if n % lanes == 0 and n >= 2 * lanes:
            parts = getattr(x.reshape(*x.shape[:-1], n // lanes, lanes), op)(axis=-2)
            return getattr(parts, op)(axis=-1, keepdims=True)
    return getattr(x, op)(axis=-1, keepdims=True)


@mx.custom_function
def exp_nonpositive(x: mx.array) -> mx.array:
    """Differentiable exp(x) for x <= 0: the caller subtracts a maximum first."""
    return fast_exp_nonpositive(x)


@exp_nonpositive.vjp
def _exp_nonpositive_vjp(primals, cotangent, output):
    return (cotangent * output,)


def _sigmoid(x: mx.array) -> mx.array:
    # exp(-|x|) never overflows; min(x, -x) is -|x| by other ops, so -|x| is not written to memory
    e = fast_exp_nonpositive(-mx.abs(x), again=mx.minimum(x, -x))
    return mx.where(x >= 0, 1.0, e) / (1.0 + e)


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's `activations.swiglu`."""
    return swiglu_value(gate, x)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return swiglu_grads(*primals, cotangent)  # recomputed rather than kept: one (tokens, intermediate) array less


def swiglu_value(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up: in one C++ pass where cpu_layers' kernels apply, else by the fast exp."""
    fused = cpu_layers.swiglu(gate, up)
    return gate * _sigmoid(gate) * up if fused is None else fused


def swiglu_grads(gate: mx.array, up: mx.array, d_out: mx.array) -> tuple[mx.array, mx.array]:
    """(d_gate, d_up) of silu(gate) * up, recomputing the sigmoid."""
    fused = cpu_layers.swiglu_grad(gate, up, d_out)
    if fused is not None:
        return tuple(fused)
    s = _sigmoid(gate)
    silu = gate * s
    return d_out * up * (s + silu * (1.0 - s)), d_out * silu


@mx.custom_function
def _target_logps(logits: mx.array, targets: mx.array):
    """(log-probs of the targets, log-partition, exp(logits - row max), its row sums): the last
    two are kept for the backward, which then needs neither the logits nor another exp."""
    top = mx.stop_gradient(row_max(logits))
    shifted_exp = fast_exp_nonpositive(logits - top)
    total = row_sum(shifted_exp)
    lse = (top + mx.log(total)).squeeze(-1)
    return _picked(logits, targets) - lse, lse, shifted_exp, total


@_target_logps.vjp
def _target_logps_vjp(primals, cotangents, outputs):
    # d logp / d logits = onehot(target) - softmax, d lse / d logits = softmax, and the softmax is
    # the forward's exp(logits - max) over its row sum: one fused pass over the vocabulary. Keeping
    # that exp instead of the logits frees the logits after the forward, and the backward needs no
    # exp of its own (whose two kernels each wrote a vocabulary-wide array). Autodiff would keep
    # the softmax too, but scatter the target's gradient into a zeroed vocabulary-wide array and
    # add the two (measured: more peak memory, three more passes).
    logits, targets = primals
    d_logp, d_lse = cotangents[:2]
    shifted_exp, total = outputs[2], outputs[3]
    target = mx.arange(logits.shape[-1]) == targets[..., None]
    d_logits = mx.where(target, d_logp[..., None], 0.0) + ((d_lse - d_logp)[..., None] / total) * shifted_exp
    return d_logits, mx.zeros_like(targets)


# Compiled on its own too, for the passes that run eagerly (reference log-probs, evaluation): its
# exp's ~20 ops would otherwise each write a vocabulary-wide array.
_compiled_target_logps = mx.compile(_target_logps)


def target_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """log softmax(logits)[target] over the last axis (float32 logits): the fast one inside
    `installed`."""
    if _ACTIVE.get():
        return _compiled_target_logps(logits, targets)[0]
    return _picked(logits, targets) - mx.logsumexp(logits, axis=-1)


def _picked(logits: mx.array, targets: mx.array) -> mx.array:
    return mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)


def active() -> bool:
    """Whether the caller runs inside `installed` (mlx-dpo's CPU fast path is on)."""
    return _ACTIVE.get()


def attention_block() -> Optional[int]:
    """Inside `installed`, when the model's attention is cpu_attention's: its query rows per
    block (0: all at once); None otherwise."""
    return _ATTENTION.get()


def recompute_activations() -> bool:
    """Inside `installed`: whether a LoRA MLP recomputes its SwiGLU product in the backward."""
    return _RECOMPUTE.get()[0]


def recompute_attention() -> bool:
    """Inside `installed`: whether attention recomputes its softmax in the backward at every length."""
    return _RECOMPUTE.get()[1]


def _targets(model) -> list[tuple[object, str, object]]:
    """(module, name, replacement) for the names in the model's module that we speed up."""
    from mlx_lm.models import activations, base

    from .cpu_attention import attention

    module = sys.modules.get(type(model).__module__)
    out = []
    if getattr(module, "swiglu", None) is activations.swiglu:
        out.append((module, "swiglu", swiglu))
    if getattr(module, "scaled_dot_product_attention", None) is base.scaled_dot_product_attention:
        out.append((module, "scaled_dot_product_attention", attention))
    return out


@contextlib.contextmanager
def installed(model, enabled: bool = True, attention_block: Optional[int] = None,
              recompute: Optional[bool] = None, recompute_attention: Optional[bool] = None):
    """Within the block, `model`'s forward uses the fast SwiGLU, attention and log-sum-exp;
    causal attention in blocks of `attention_block` query rows (0: all at once); with `recompute`
    a LoRA MLP's SwiGLU product and with `recompute_attention` attention's softmax recomputed in
    the backward. None: the config's defaults (`compute.attention_block`,
    `compute.recompute_activations`, `compute.recompute_attention`)."""
    from .config import ComputeConfig

    if attention_block is None:
        attention_block = ComputeConfig.attention_block
    if recompute is None:
        recompute = ComputeConfig.recompute_activations
    if recompute_attention is None:
        recompute_attention = ComputeConfig.recompute_attention
    if not enabled or mx.default_device() != mx.cpu or _ACTIVE.get():
        yield
        return
    targets = _targets(model)
    saved = [(module, name, getattr(module, name)) for module, name, _ in targets]
    token = _ACTIVE.set(True)
    ours = any(name == "scaled_dot_product_attention" for _, name, _ in targets)
    attention_token = _ATTENTION.set(attention_block if ours else None)
    recompute_token = _RECOMPUTE.set((recompute, recompute_attention))
    try:
        for module, name, fast in targets:
            setattr(module, name, fast)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        _RECOMPUTE.reset(recompute_token)
        _ATTENTION.reset(attention_token)
        _ACTIVE.reset(token)
