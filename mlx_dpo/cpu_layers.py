"""RMSNorm, SwiGLU and RoPE in mlx-dpo's C++ kernels (native.py) inside its CPU forward passes,
and, for full fine-tuning, linear layers whose weight gradient comes out in the weight's layout.

MLX's CPU backend computes each of the three as a chain of ops, one pass over memory per op, and
its `mx.fast.rms_norm` and `mx.fast.rope` fall back to those ops on the CPU: per layer of
SmolLM2-135M at 376 tokens (one thread, forward and backward, a scratch timing) RMSNorm took
1.1 ms, SwiGLU 3.6 ms, the queries' RoPE 1.5 ms. The kernels read and write each row once: 0.2,
1.0 and 0.4 ms (docs/benchmarks.md, session 11). RoPE's backward also writes its gradient in the
(batch, positions, heads, size) layout that the projection's backward reads, so that the head
transpose costs no copy.

`use_native_layers(model)` gives the model's plain `nn.RMSNorm` and `nn.RoPE` modules (and, with
`trained_linears`, its plain `nn.Linear` ones) subclasses that take these paths inside
`cpu_kernels.installed` (mlx-dpo's own forward passes on the CPU) and behave as their parents
everywhere else; `swiglu` and `swiglu_grad` serve cpu_kernels and cpu_lora. Without the kernels
(`native.kernels()` is None: no compiler, `MLX_DPO_NATIVE=0`) everything runs on MLX ops as before.
"""
from __future__ import annotations

import functools
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernels, native

NO_RESTART = 2**30  # a split past any sequence: positions never restart


def kernels_for(*arrays: mx.array):
    """The C++ kernels when they apply to these arrays (float32, inside mlx-dpo's CPU passes)."""
    if not cpu_kernels.active() or any(a.dtype != mx.float32 for a in arrays):
        return None
    return native.kernels()


# ---- SwiGLU ------------------------------------------------------------------------------------

def swiglu(gate: mx.array, up: mx.array) -> Optional[mx.array]:
    """silu(gate) * up in one pass, or None where the kernels do not apply."""
    kernels = kernels_for(gate, up)
    return None if kernels is None or gate.shape != up.shape else kernels.swiglu(gate, up)


def swiglu_grad(gate: mx.array, up: mx.array, d_out: mx.array) -> Optional[tuple[mx.array, mx.array]]:
    """(d_gate, d_up) of silu(gate) * up in one pass, or None where the kernels do not apply."""
    kernels = kernels_for(gate, up, d_out)
    return None if kernels is None or gate.shape != up.shape else kernels.swiglu_grad(gate, up, d_out)


# ---- RMSNorm -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _rms_norm(eps: float):
    @mx.custom_function
    def norm(x, weight):
        return native.kernels().rms_norm(x, weight, eps)  # (y, 1 / rms per row): the latter for the backward

    @norm.vjp
    def norm_vjp(primals, cotangents, outputs):
        x, weight = primals
        return native.kernels().rms_norm_grad(x, weight, outputs[1], cotangents[0])

    return norm


class NativeRMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        if kernels_for(x, self.weight) is None:
            return super().__call__(x)
        return _rms_norm(float(self.eps))(x, self.weight)[0]


# ---- RoPE --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _rope(base: float, scale: float, offset: int, split: int, restart: int):
    def rotate(x, inverse, seq_major):
        return native.kernels().rope(x, base, scale, offset, split, restart, inverse, seq_major)

    @mx.custom_function
    def rope(x):
        return rotate(x, False, False)

    @rope.vjp
    def rope_vjp(primals, cotangent, output):
        # Written (batch, positions, heads, size) and handed back transposed: the model made x as
        # that layout's transpose, so the gradient reaches its projection without a copy.
        return (rotate(cotangent, True, True).transpose(0, 2, 1, 3),)

    return rope


class NativeRoPE(nn.RoPE):
    def __call__(self, x: mx.array, offset=0) -> mx.array:
        out = self.restarting(x, offset, NO_RESTART, 0)
        return super().__call__(x, offset=offset) if out is None else out

    def restarting(self, x: mx.array, offset, split: int, restart: int) -> Optional[mx.array]:
        """RoPE with positions offset.. for columns before `split` and restart.. from it, in one
        pass; None where the kernel does not apply (then the caller uses MLX's)."""
        if (self.traditional or x.ndim != 4 or x.shape[-1] != self.dims or not isinstance(offset, int)
                or kernels_for(x) is None):
            return None
        return _rope(float(self.base), float(self.scale), int(offset), split, restart)(x)


# ---- Linear: the weight's gradient in the weight's layout --------------------------------------

@mx.custom_function
def _linear(x, weight):
    return x @ weight.T


@_linear.vjp
def _linear_vjp(primals, cotangent, output):
    # MLX's own VJP of x @ W.T gives W's gradient as the transpose of x^T dY: a column-major view,
    # which the optimizer's one-pass kernel, the sum over CPU streams and the norm would each copy
    # first. dY^T x is the same product, already laid out as W.
    x, weight = primals
    rows = cotangent.reshape(-1, cotangent.shape[-1])
    return cotangent @ weight, rows.T @ x.reshape(-1, x.shape[-1])


class RowMajorGradLinear(nn.Linear):
    """nn.Linear whose weight gradient comes out row-major, inside mlx-dpo's CPU passes (full
    fine-tuning trains these weights; under LoRA the gradient is never evaluated)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not cpu_kernels.active() or x.dtype != mx.float32 or self.weight.dtype != mx.float32:
            return super().__call__(x)
        y = _linear(x, self.weight)
        return y + self.bias if "bias" in self else y


def use_native_layers(model: nn.Module, trained_linears: bool = False) -> int:
    """Give the model's plain RMSNorm and RoPE modules (and, for full fine-tuning, its plain
    Linear modules) the subclasses above; how many. LoRA wraps plain linears itself
    (cpu_lora.py), so they stay plain there."""
    swapped = 0
    classes = ((nn.RMSNorm, NativeRMSNorm), (nn.RoPE, NativeRoPE))
    if trained_linears:
        classes += ((nn.Linear, RowMajorGradLinear),)
    for _, module in model.named_modules():
        for plain, native_class in classes:
            if type(module) is plain:
                module.__class__ = native_class
                swapped += 1
    return swapped
