#!/usr/bin/env python
"""Probe, not part of mlx-dpo's API: the BLAS that MLX calls, on a step's matmul shapes.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/probe_blas_shapes.py
    MLX_DPO_BLAS=/path/to/libblis.so.4 .venv/bin/python scripts/probe_blas_shapes.py

Times MLX's fp32 matmuls of SmolLM2-135M's weight shapes against 376 tokens (one CPU stream's
share of the bench's 256-token batch) and 1846 tokens (one pair at 1024), forward (x W^T) and
input gradient (dY W), best of 15 per shape in each of three rounds; then attention's two product
shapes for one head over 1846 tokens (the scores Q K^T and the weighted values P V, full rather
than causal: what OpenBLAS would do in place of mlx-dpo's attention kernel, whose own rates
scripts/bench_attention_kernel.py gives), then one 2048^3 matmul. Which
library is loaded follows mlx-dpo's rules (`hardware.prepare_runtime`): OpenBLAS, or the library
that MLX_DPO_BLAS names, if it exports `cblas_sgemm`. docs/benchmarks.md (session 19) has a run
against Debian's BLIS.
"""
import time

from mlx_dpo import hardware  # binds the BLAS before mlx loads

import mlx.core as mx

SHAPES = [(376, 576, 576), (376, 576, 192), (376, 576, 1536), (376, 1536, 576), (1846, 576, 1536),
          (1846, 1536, 576)]  # (tokens, inputs, outputs)
ATTENTION = (1846, 64)  # (tokens, head size)
ROUNDS, REPEATS = 3, 15


def best_gflops(fn, flops: float) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return flops / min(times) / 1e9


def main() -> None:
    print("BLAS:", hardware.prepare_runtime()["blas"])
    mx.random.seed(0)
    rates: dict = {}
    for _ in range(ROUNDS):
        for tokens, inputs, outputs in SHAPES:
            x, w = mx.random.normal((tokens, inputs)), mx.random.normal((outputs, inputs))
            d_y = mx.random.normal((tokens, outputs))
            mx.eval(x, w, d_y)
            flops = 2 * tokens * inputs * outputs
            for name, fn in (("forward", lambda: x @ w.T), ("input grad", lambda: d_y @ w)):
                rates.setdefault((tokens, inputs, outputs, name), []).append(best_gflops(fn, flops))
    for (tokens, inputs, outputs, name), values in rates.items():
        print(f"{tokens:5d} tokens, W {outputs:4d} x {inputs:4d}, {name:10s}: "
              + " ".join(f"{v:6.1f}" for v in values) + " GFLOP/s")
    tokens, size = ATTENTION
    q, k, v = (mx.random.normal((tokens, size)) for _ in range(3))
    p = mx.random.normal((tokens, tokens))
    mx.eval(q, k, p, v)
    flops = 2 * tokens * tokens * size
    for name, fn in ((f"scores Q K^T, {tokens} x {size} by {size} x {tokens}", lambda: q @ k.T),
                     (f"weighted values P V, {tokens} x {tokens} by {tokens} x {size}", lambda: p @ v)):
        print(f"attention {name}: " + " ".join(f"{best_gflops(fn, flops):6.1f}" for _ in range(ROUNDS)) + " GFLOP/s")
    a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
    mx.eval(a, b)
    print(f"2048^3: {best_gflops(lambda: a @ b, 2 * 2048**3):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
