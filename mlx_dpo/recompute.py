"""Recomputation in the backward pass that saves memory under MLX's wide evaluation order.

MLX evaluates a graph in breadth-first windows (`MLX_BFS_MAX_WIDTH`; mlx-dpo sets 2000 on the CPU
so that its CPU streams overlap). Two things then keep arrays alive that a recomputation was
meant to free:

- A parameter's gradient is a leaf that nothing in the backward chain waits for, so MLX may
  compute it only at the very end, holding its inputs (a layer's recomputed activations, or
  the (tokens x features) arrays a weight gradient is made from) until then. `ordered` makes
  the input gradient, which the next layer's backward needs, wait for the parameter gradients:
  each layer's are then made, and their inputs freed, as the backward passes through it.
- A recomputation whose inputs are all forward values may run as soon as the forward has made
  them, which keeps what it recomputes alive as long as keeping the original would.
  Depending on the incoming cotangent (`after`) holds it back until the backward gets there.

`checkpoint(fn)` is `mx.checkpoint` with its parameter gradients ordered. A LoRA step of the
bench's shape (SmolLM2-135M, 2 pairs of ~500 tokens, every block checkpointed) peaks at 0.72 GB
where `mx.checkpoint` peaked at 1.64 GB, and without checkpointing at 1.89 GB (1.61 GB with the
SwiGLU recomputation in cpu_lora.py). docs/benchmarks.md has the bench's own figures.
"""
from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


def ordered(input_grads: Sequence[mx.array], param_grads: Sequence[mx.array]) -> list[mx.array]:
    """`input_grads`, evaluated only once `param_grads` are."""
    return mx.depends(list(input_grads), list(param_grads))


def after(arrays: Sequence[mx.array], cotangent: mx.array) -> list[mx.array]:
    """`arrays`, for a recomputation that must wait until the backward brings `cotangent`."""
    return mx.depends(list(arrays), [cotangent])


def checkpoint(fn: Callable[[dict, mx.array], mx.array]) -> Callable[[dict, mx.array], mx.array]:
    """fn(params, x) -> y, recomputed in the backward pass; params is a tree of arrays."""

    @mx.custom_function
    def forward(params, x):
        return fn(params, x)

    @forward.vjp
    def backward(primals, cotangent, output):
        params, x = primals
        names, leaves = zip(*tree_flatten(params)) if params else ((), ())
        # Depending on the output (as mx.checkpoint does) keeps mx.compile from merging the
        # recomputation with the forward. Depending on the cotangent instead was slower
        # (9.7 against 5.7 s per step) for 0.07 GB less.
        *leaves, x = mx.depends([*leaves, x], [output])

        def flat(*arrays):
            return fn(tree_unflatten(list(zip(names, arrays[:-1]))), arrays[-1])

        _, grads = mx.vjp(flat, [*leaves, x], [cotangent])
        *param_grads, d_x = grads
        if param_grads:
            d_x, = ordered([d_x], param_grads)
        return (tree_unflatten(list(zip(names, param_grads))) if names else params), d_x

    return forward
