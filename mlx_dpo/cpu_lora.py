"""LoRA's low-rank branch accumulated into the base matmul's output, for MLX's CPU backend.

mlx-lm's `LoRALinear` computes `linear(x) + scale * (x @ A) @ B`. The second product has
rank-r inner size, so on the CPU it costs what its output costs: OpenBLAS zeroes the
(tokens x outputs) result, writes it, and a third pass adds it to the base output. The backward
does the same for the input gradient (`dy @ W + dz @ A^T`). `mx.addmm` accumulates the rank-r
product into the base result instead (beta = 1: no zeroing, no separate add), in the forward
and, through the VJP here, in the backward. One fp32 rank-8 layer of SmolLM2-135M's shapes,
752 tokens, forward and backward (scripts/bench_cpu_ops.py): 576x1536 9.22 against 10.81 ms,
576x576 4.09 against 4.79 ms. The values are mlx-lm's up to float rounding
(tests/test_cpu_lora.py).

`use_addmm(model)` gives every plain `LoRALinear` of a model this class; its parameters, and so
saved adapters, are unchanged. The fused path runs only inside `cpu_kernels.installed` (mlx-dpo's
CPU fast path), in float32, without dropout; anything else takes mlx-lm's own `__call__`.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from . import cpu_kernels


@mx.custom_function
def _lora_linear(x, weight, lora_a, lora_b, scale):
    """x (tokens, in) @ weight.T + scale * (x @ lora_a) @ lora_b (scale: a (1,) array, as a custom
    function's inputs are arrays; it is not trained)."""
    return mx.addmm(x @ weight.T, (x @ lora_a) * scale, lora_b)


@_lora_linear.vjp
def _lora_linear_vjp(primals, cotangent, output):
    x, weight, lora_a, lora_b, scale = primals
    d_low = (cotangent @ lora_b.T) * scale  # (tokens, r)
    d_x = mx.addmm(cotangent @ weight, d_low, lora_a.T)
    # Lazy: nothing evaluates the frozen weight's gradient unless someone asks for it.
    d_weight = cotangent.T @ x
    d_lora_b = ((x @ lora_a) * scale).T @ cotangent
    return d_x, d_weight, x.T @ d_low, d_lora_b, mx.zeros_like(scale)


class AddmmLoRALinear(LoRALinear):
    def __call__(self, x):
        if not self._fusable(x):
            return super().__call__(x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        y = _lora_linear(flat, self.linear.weight, self.lora_a, self.lora_b,
                         mx.array([self.scale], dtype=x.dtype))
        if "bias" in self.linear:
            y = y + self.linear.bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def _fusable(self, x) -> bool:
        return (cpu_kernels.active() and type(self.linear) is nn.Linear
                and x.dtype == self.linear.weight.dtype == self.lora_a.dtype == mx.float32
                and (getattr(self.dropout, "_p_1", 0) == 1 or not self.training))  # _p_1: 1 - p


def use_addmm(model: nn.Module) -> int:
    """Give each plain LoRALinear of `model` the fused CPU path; returns how many."""
    layers = [m for _, m in model.named_modules() if type(m) is LoRALinear]
    for layer in layers:
        layer.__class__ = AddmmLoRALinear
    return len(layers)
