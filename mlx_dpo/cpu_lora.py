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

Where native.py's kernels are built and the rank is 4, 8, 16, 32 or 64, the rank-r products run in
C++ instead (csrc/lora_kernels.cpp): one pass over the rows makes the forward's branch, another the
backward's input-gradient part and both LoRA gradients, and each result is the C into which OpenBLAS
adds the frozen product (beta = 1, so no pass over that product's output and no zeroing pass).
The bench's LoRA step ran 1.06-1.10x faster than with `mx.addmm` (medians of two interleaved A/B
runs; docs/benchmarks.md, session 17).

With compute.recompute_activations, a SwiGLU MLP whose down projection is such a layer runs
SwiGLU and the down projection as one function whose backward recomputes silu(gate) * up from
gate and up (kept anyway for SwiGLU's own backward) instead of keeping it: 1536 floats per token
and layer of SmolLM2-135M, 0.28 GB of a bench LoRA step's 1.89 GB peak, for one more fused pass.

`use_addmm(model)` gives every plain `LoRALinear` of a model this class, and such MLPs theirs;
parameters, and so saved adapters, are unchanged. The fused paths run only inside
`cpu_kernels.installed` (mlx-dpo's CPU fast path), in float32, without dropout; anything else
takes mlx-lm's own `__call__`.
"""
from __future__ import annotations

import os
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from . import cpu_kernels, cpu_layers, hardware, native
from .recompute import after, ordered


NATIVE_RANKS = (4, 8, 16, 32, 64)  # what csrc/lora_kernels.cpp is built for


def _native_rank(lora_a: mx.array) -> bool:
    """Whether the C++ LoRA kernels are for this adapter: a rank they have, not switched off by
    MLX_DPO_NATIVE_LORA=0."""
    return lora_a.shape[-1] in NATIVE_RANKS and os.environ.get("MLX_DPO_NATIVE_LORA", "1") != "0"


def _lora_kernels(lora_a: mx.array):
    """mlx-dpo's C++ LoRA kernels where they apply (built, float32, `_native_rank`), else None:
    then `mx.addmm` carries the rank-r products."""
    return cpu_layers.kernels_for(lora_a) if _native_rank(lora_a) else None


class FrozenPanels:
    """A LoRA layer's frozen weight packed once for OpenBLAS's micro-kernel, in the forward's and
    the input gradient's layouts (csrc/frozen_gemm.cpp), so that no product packs it again.

    Holds the weight as well: the panels are used only with the buffer they were made from (checked
    in C++ at each product), and holding it keeps that address from being reused by another array.
    A weight replaced later (`model.update`) gets plain OpenBLAS products, correct and slower."""

    def __init__(self, weight: mx.array, kernels):
        self.weight = weight
        self.forward = kernels.pack_frozen(weight, True)
        self.backward = kernels.pack_frozen(weight, False)
        mx.eval(self.forward, self.backward)

    @property
    def nbytes(self) -> int:
        return self.forward.nbytes + self.backward.nbytes


def _frozen_addmm(kernels, c, x, weight, panels, forward: bool):
    """c + x @ weight.T (forward) or c + x @ weight, on the panels where the layer has them."""
    if panels is not None:
        return kernels.frozen_addmm(c, x, weight, panels[0 if forward else 1], forward)
    return mx.addmm(c, x, weight.T if forward else weight)


@mx.custom_function
def _lora_linear(x, weight, lora_a, lora_b, scale, panels=None):
    """x (tokens, in) @ weight.T + scale * (x @ lora_a) @ lora_b (scale: a (1,) array, as a custom
    function's inputs are arrays; it is not trained). panels: (forward, backward) of the layer's
    FrozenPanels, or None."""
    kernels = _lora_kernels(lora_a)
    if kernels is not None:  # the rank-r branch first, as the frozen product's C (beta = 1)
        return _frozen_addmm(kernels, kernels.lora_low(x, lora_a, lora_b, scale), x, weight, panels, True)
    return mx.addmm(x @ weight.T, (x @ lora_a) * scale, lora_b)


@_lora_linear.vjp
def _lora_linear_vjp(primals, cotangent, output):
    return _lora_linear_grads(*primals, cotangent)


def _lora_linear_grads(x, weight, lora_a, lora_b, scale, panels, cotangent):
    # Lazy: nothing evaluates the frozen weight's gradient (or the panels') unless someone asks for it.
    d_weight = cotangent.T @ x
    d_panels = None if panels is None else tuple(mx.zeros_like(p) for p in panels)
    kernels = _lora_kernels(lora_a)
    if kernels is not None:  # one pass over the rows for every rank-r product
        d_x_low, d_lora_a, d_lora_b = kernels.lora_grad(cotangent, x, lora_a, lora_b, scale)
        d_x = _frozen_addmm(kernels, d_x_low, cotangent, weight, panels, False)
        return d_x, d_weight, d_lora_a, d_lora_b, mx.zeros_like(scale), d_panels
    d_low = (cotangent @ lora_b.T) * scale  # (tokens, r)
    d_x = mx.addmm(cotangent @ weight, d_low, lora_a.T)
    d_lora_b = ((x @ lora_a) * scale).T @ cotangent
    return d_x, d_weight, x.T @ d_low, d_lora_b, mx.zeros_like(scale), d_panels


@mx.custom_function
def _swiglu_lora_down(gate, up, weight, lora_a, lora_b, scale, panels=None):
    """A LoRA down projection of silu(gate) * up (gate, up: (tokens, intermediate))."""
    return _lora_linear(cpu_kernels.swiglu(gate, up), weight, lora_a, lora_b, scale, panels)


@_swiglu_lora_down.vjp
def _swiglu_lora_down_vjp(primals, cotangent, output):
    # The SwiGLU product is recomputed here rather than kept from the forward: the down
    # projection's LoRA gradient needs it, and keeping it for every layer was 18% of a LoRA
    # step's activations. SwiGLU's own backward needs gate and up, which are kept anyway.
    gate, up, weight, lora_a, lora_b, scale, panels = primals
    gate, up = after([gate, up], cotangent)
    hidden = cpu_kernels.swiglu_value(gate, up)
    d_hidden, d_weight, d_lora_a, d_lora_b, d_scale, d_panels = _lora_linear_grads(
        hidden, weight, lora_a, lora_b, scale, panels, cotangent)
    d_gate, d_up = ordered(list(cpu_kernels.swiglu_grads(gate, up, d_hidden)), [d_lora_a, d_lora_b])
    return d_gate, d_up, d_weight, d_lora_a, d_lora_b, d_scale, d_panels


class AddmmLoRALinear(LoRALinear):
    def __call__(self, x):
        if not self._fusable(x):
            return super().__call__(x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        y = _lora_linear(flat, self.linear.weight, self.lora_a, self.lora_b,
                         mx.array([self.scale], dtype=x.dtype), self._panel_pair())
        if "bias" in self.linear:
            y = y + self.linear.bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def _panel_pair(self):
        panels = getattr(self, "frozen_panels", None)
        return None if panels is None else (panels.forward, panels.backward)

    def _fusable(self, x) -> bool:
        return (cpu_kernels.active() and type(self.linear) is nn.Linear
                and x.dtype == self.linear.weight.dtype == self.lora_a.dtype == mx.float32
                and (getattr(self.dropout, "_p_1", 0) == 1 or not self.training))  # _p_1: 1 - p


def use_addmm(model: nn.Module) -> int:
    """Give each plain LoRALinear of `model` the fused CPU path, and each SwiGLU MLP whose down
    projection is one of them the recomputing backward; returns how many LoRA layers."""
    layers = [m for _, m in model.named_modules() if type(m) is LoRALinear]
    for layer in layers:
        layer.__class__ = AddmmLoRALinear
    recomputing = {}  # an MLP class -> its recomputing subclass, or None where the check failed
    for _, module in model.named_modules():
        projections = _lora_swiglu_projections(module)
        if projections:
            if type(module) not in recomputing:
                recomputing[type(module)] = _recomputing_class(module, *projections)
            if recomputing[type(module)] is not None:
                module.__class__ = recomputing[type(module)]
    return len(layers)


def pack_frozen_weights(model: nn.Module) -> int:
    """Give each fused LoRA layer of `model` over a float32 nn.Linear its FrozenPanels, where
    native.py's kernels are built and found OpenBLAS's micro-kernel (else nothing); returns the
    panels' bytes (twice the packed weights': one layout per product)."""
    layers = [layer for _, layer in model.named_modules()
              if isinstance(layer, AddmmLoRALinear) and type(layer.linear) is nn.Linear
              and layer.linear.weight.dtype == mx.float32 and _native_rank(layer.lora_a)]
    kernels = native.kernels() if layers else None
    if kernels is None or not kernels.frozen_kernels() or not _panels_agree(kernels):
        return 0
    for layer in layers:
        layer.frozen_panels = FrozenPanels(layer.linear.weight, kernels)
    return sum(layer.frozen_panels.nbytes for layer in layers)


def _panels_agree(kernels) -> bool:
    """Whether products on panels equal MLX's on this OpenBLAS (its kernels are looked up by name,
    and a core whose copy routines and micro-kernel disagree with the driver they were written for
    must not be used): checked once, on odd sizes, with one OpenBLAS thread as in the CPU streams."""
    if "panels_agree" not in _checked:
        keys = mx.random.split(mx.random.key(0), 4)
        w = mx.random.normal((41, 37), key=keys[0])
        x, dy = mx.random.normal((9, 37), key=keys[1]), mx.random.normal((9, 41), key=keys[2])
        c = mx.random.normal((9, 41), key=keys[3])
        with hardware.openblas_threads(1):
            forward = kernels.frozen_addmm(c, x, w, kernels.pack_frozen(w, True), True)
            backward = kernels.frozen_addmm(x, dy, w, kernels.pack_frozen(w, False), False)
            mx.eval(forward, backward)
        _checked["panels_agree"] = (mx.allclose(forward, mx.addmm(c, x, w.T), rtol=1e-4, atol=1e-4).item()
                                    and mx.allclose(backward, mx.addmm(x, dy, w), rtol=1e-4, atol=1e-4).item())
    return _checked["panels_agree"]


_checked: dict = {}


def _lora_swiglu_projections(mlp: nn.Module):
    """The module's gate, up and down projections if all three are LoRA layers over a plain
    linear without a bias and its module calls mlx-lm's `swiglu`; else None. Per instance:
    LoRA may cover only some layers of a model."""
    from mlx_lm.models import activations

    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if (all(isinstance(p, AddmmLoRALinear) and type(p.linear) is nn.Linear and "bias" not in p.linear
            for p in projections)
            and getattr(sys.modules.get(type(mlp).__module__), "swiglu", None) is activations.swiglu):
        return projections
    return None


def _down_of_swiglu(gate: mx.array, up: mx.array, down: AddmmLoRALinear) -> mx.array:
    """down(swiglu(gate, up)) through `_swiglu_lora_down`, for gate and up (..., intermediate)."""
    width = gate.shape[-1]
    y = _swiglu_lora_down(gate.reshape(-1, width), up.reshape(-1, width), down.linear.weight, down.lora_a,
                          down.lora_b, mx.array([down.scale], dtype=gate.dtype), down._panel_pair())
    return y.reshape(*gate.shape[:-1], y.shape[-1])


def _recomputing_class(mlp: nn.Module, gate: AddmmLoRALinear, up: AddmmLoRALinear, down: AddmmLoRALinear):
    """A subclass of the MLP's class whose call recomputes the SwiGLU product in the backward
    (inside `cpu_kernels.installed`, with compute.recompute_activations), or None where the class
    does not compute down(swiglu(gate(x), up(x))): checked on three tokens."""
    base = type(mlp)

    def call(self, x):
        if not (cpu_kernels.recompute_activations() and self.down_proj._fusable(x)):
            return base.__call__(self, x)
        return _down_of_swiglu(self.gate_proj(x), self.up_proj(x), self.down_proj)

    weight = gate.linear.weight
    x = mx.random.normal((1, 3, weight.shape[1]), key=mx.random.key(0)).astype(weight.dtype)
    if not mx.allclose(_down_of_swiglu(gate(x), up(x), down), base.__call__(mlp, x), rtol=1e-3, atol=1e-4).item():
        return None
    return type(f"Recomputing{base.__name__}", (base,), {"__call__": call})
