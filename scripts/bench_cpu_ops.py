#!/usr/bin/env python
"""Per-float cost of elementwise work on MLX's CPU backend, and the fp32 matmul rate: what
decides how much of a DPO step the matmuls are on a given machine.

    .venv/bin/python scripts/bench_cpu_ops.py      # best of 5 each, 10M floats
"""
import time

import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_dpo import cpu_kernels

N = 10_000_000


def best_seconds(fn, *args, repeats: int = 5) -> float:
    mx.eval(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    x = -mx.abs(mx.random.normal((N,)))
    mx.eval(x)
    for name, fn in [("a + 1.0", lambda a: a + 1.0), ("MLX exp", mx.exp),
                     ("mlx-dpo fast exp (compiled)", mx.compile(cpu_kernels.fast_exp_nonpositive))]:
        print(f"{name}: {best_seconds(fn, x) / N * 1e9:.2f} ns per float")
    a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
    print(f"fp32 matmul 2048^3: {2 * 2048**3 / best_seconds(lambda: a @ b) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
