#!/usr/bin/env python
"""mlx-dpo's C++ causal attention alone, forward and backward, on the bench model's head layout
(9 query heads over 3 kv heads of 64), one sequence, one thread.

    .venv/bin/python scripts/bench_attention_kernel.py [KEYS] [REPEATS]
    .venv/bin/python scripts/bench_attention_kernel.py 1846 9

GFLOP/s counts the causal half's products once each (forward: QK^T and PV; backward: dO V^T, dQ,
dK, dV), not the backward's recomputation of QK^T, as the bench's utilisation does. With
MLX_DPO_NATIVE_SO=path/to/_native...so another build of the module is timed (for A/B runs of two
builds, alternated by the caller). Prints min and median milliseconds over REPEATS runs.
"""
import os
import sys
import time
from pathlib import Path

import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_dpo import native
from mlx_dpo.cpu_attention import NO_SPLIT


def main() -> None:
    keys = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    build = os.environ.get("MLX_DPO_NATIVE_SO")
    kernels = native._import(Path(build)) if build else native.kernels()
    if kernels is None:
        sys.exit(f"mlx-dpo's C++ kernels are unavailable: {native.status()}")
    batch, heads, kv_heads, size = 1, 9, 3, 64
    mx.random.seed(0)
    q = mx.random.normal((batch, heads, keys, size)) * size**-0.5
    k, v = mx.random.normal((batch, kv_heads, keys, size)), mx.random.normal((batch, kv_heads, keys, size))
    d_out = mx.random.normal(q.shape)
    left_pad = mx.zeros((batch,), dtype=mx.int32)
    mx.eval(q, k, v, d_out, left_pad)

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        out = kernels.causal_attention(q, k, v, left_pad, 0, NO_SPLIT, NO_SPLIT)
        mx.eval(out)
        middle = time.perf_counter()
        mx.eval(kernels.causal_attention_grad(q, k, v, *out, d_out, left_pad, 0, NO_SPLIT, NO_SPLIT))
        return middle - start, time.perf_counter() - middle

    once()  # warm-up
    forward, backward = (sorted(t) for t in zip(*(once() for _ in range(repeats))))
    product = 2 * size * batch * heads * keys * (keys + 1) / 2  # FLOPs of one causal product
    for name, times, products in (("forward", forward, 2), ("backward", backward, 4)):
        print(f"{keys} keys, {name}: min {times[0] * 1e3:.1f} ms, median {times[len(times) // 2] * 1e3:.1f} ms, "
              f"{products * product / times[0] / 1e9:.0f} GFLOP/s (best)")


if __name__ == "__main__":
    main()
