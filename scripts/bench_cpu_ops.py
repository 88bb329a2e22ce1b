#!/usr/bin/env python
"""Per-float cost of elementwise work on MLX's CPU backend, and the fp32 matmul rate: what
decides how much of a DPO step the matmuls are on a given machine.

    .venv/bin/python scripts/bench_cpu_ops.py      # best of 5 each, 10M floats

Each elementwise op is timed twice: with MLX's default 32 MiB buffer cache, where every 40 MB
result lands in fresh pages that the kernel must map and zero (what one-off work pays), and
with the cache that training sets up (`hardware.keep_cpu_buffers`), where a step's results
reuse freed buffers (what the ops inside a training step pay). Row maxima and sums are timed
against `cpu_kernels.row_max` and `row_sum`, and one LoRA layer's forward and backward against
`cpu_lora`'s.
"""
import time

import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_dpo import cpu_kernels, hardware

N = 10_000_000


def best_seconds(fn, *args, repeats: int = 5) -> float:
    mx.eval(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def lora_layers(tokens: int = 752) -> None:
    """One LoRA layer's forward and backward (rank 8, SmolLM2-135M's shapes, the bench's tokens per
    step): mlx-lm's LoRALinear against mlx-dpo's addmm one (mlx_dpo/cpu_lora.py)."""
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_dpo import cpu_lora

    class Host(nn.Module):  # `installed` needs a model; this one has no functions to swap
        pass

    for fan_in, fan_out in [(576, 576), (576, 1536)]:
        x = mx.random.normal((tokens, fan_in))
        d_y = mx.random.normal((tokens, fan_out))
        mx.eval(x, d_y)  # else the compiled step would redraw them every call
        for name, fused in [("mlx-lm LoRALinear", False), ("mlx-dpo addmm LoRA", True)]:
            layer = LoRALinear(fan_in, fan_out, r=8)
            layer.lora_b = mx.random.normal((8, fan_out)) * 0.01
            if fused:
                cpu_lora.use_addmm(nn.Sequential(layer))
            mx.eval(layer.parameters())

            def forward(x, a, b, layer=layer):
                layer.lora_a, layer.lora_b = a, b
                return layer(x)

            step = mx.compile(lambda x, a, b, forward=forward: mx.vjp(forward, [x, a, b], [d_y]))
            with cpu_kernels.installed(Host()):
                seconds = best_seconds(step, x, layer.lora_a, layer.lora_b, repeats=20)
            print(f"{name} {fan_in}x{fan_out}, {tokens} tokens, forward and backward: {seconds * 1e3:.2f} ms")


def main() -> None:
    x = -mx.abs(mx.random.normal((N,)))
    mx.eval(x)
    ops = [("a + 1.0", lambda a: a + 1.0), ("MLX exp", mx.exp),
           ("mlx-dpo fast exp (compiled)", mx.compile(cpu_kernels.fast_exp_nonpositive))]
    for cache in ("fresh pages (MLX's default cache)", "reused buffers (training's cache)"):
        if cache.startswith("reused"):
            hardware.keep_cpu_buffers()
        for name, fn in ops:
            print(f"{name}, {cache}: {best_seconds(fn, x) / N * 1e9:.2f} ns per float")
    # Row maxima and sums (a softmax's reductions), reused buffers: attention scores, then
    # vocabulary rows.
    for shape in [(9, 620, 1240), (200, 49152)]:
        rows = mx.random.normal(shape)
        mx.eval(rows)
        for name, fn in [("MLX max", lambda r: r.max(axis=-1, keepdims=True)),
                         ("mlx-dpo row_max", cpu_kernels.row_max),
                         ("MLX sum", lambda r: r.sum(axis=-1, keepdims=True)),
                         ("mlx-dpo row_sum", cpu_kernels.row_sum)]:
            print(f"{name} over rows of {shape[-1]}: {best_seconds(fn, rows) / rows.size * 1e9:.2f} ns per float")
    lora_layers()
    a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
    print(f"fp32 matmul 2048^3: {2 * 2048**3 / best_seconds(lambda: a @ b) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
