#!/usr/bin/env python
"""The order in which a step's gradient parts are handed to `mx.eval`, timed side by side.

With two CPU streams (engines/cpu_streams.py) one thread dispatches both streams' operations and
stays only a few ahead of them. This times the bench's step (scripts/bench.py's model and pairs,
cached reference, every technique on) with the two parts' gradient leaves alternating (what
mlx-dpo does, `cpu_streams.alternating_leaves`) and with each part's tree whole, one after the other
(before session 16), the two orders alternating step by step in one process, and prints each
order's min / median seconds per step and how many cores the process kept busy (CPU time over
wall time, median over steps):

    .venv/bin/python scripts/bench_stream_order.py [--finetune lora|full] [--steps 8]

Run scripts/bench.py once first (it converts the model and writes the pairs). Its figures are in
docs/benchmarks.md ("Feeding both CPU streams").
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import bench_runners  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--finetune", choices=["lora", "full"], default="full")
    p.add_argument("--steps", type=int, default=8, help="timed steps per order (after one untimed round)")
    args = p.parse_args()

    import numpy as np

    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
    from mlx_dpo import refcache
    from mlx_dpo.config import config_from_dict
    from mlx_dpo.data.batching import collate
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines import cpu_streams, mlx_engine

    work = bench.ROOT / ".bench"
    spec = bench.base_spec(work, bench.default_model(work), 256, 2, steps=args.steps, warmup=1)
    cfg = config_from_dict(bench_runners._mlx_dpo_config({**spec, "finetune": args.finetune}, {}), source="bench")
    engine = mlx_engine.MLXEngine(cfg)
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs[:2]
    refcache.attach(pairs, np.full((2, 2), -300.0))  # fixed numbers: only the step is timed
    batch = collate(pairs, engine.tokenizer.eos_token_id)

    orders = {"alternating leaves": cpu_streams.alternating_leaves,
              "whole trees in turn": lambda trees: list(trees)}
    times: dict[str, list[float]] = {name: [] for name in orders}
    busy: dict[str, list[float]] = {name: [] for name in orders}
    for round_ in range(args.steps + 1):
        names = list(orders) if round_ % 2 else list(orders)[::-1]
        for name in names:
            mlx_engine.alternating_leaves = orders[name]
            start, cpu = time.perf_counter(), cpu_seconds()
            engine.forward_backward(batch, 2)
            engine.apply_update(1e-6)
            wall = time.perf_counter() - start
            if round_:  # the first round traces and warms up
                times[name].append(wall)
                busy[name].append((cpu_seconds() - cpu) / wall)
    mlx_engine.alternating_leaves = cpu_streams.alternating_leaves
    print(f"mlx-dpo {args.finetune}, seq 256, batch 2, {args.steps} steps per order, alternating")
    for name in orders:
        print(f"  {name:20s} min {min(times[name]):.2f} s, median {statistics.median(times[name]):.2f} s; "
              f"cores busy (median) {statistics.median(busy[name]):.2f}")
    base, ours = (statistics.median(times[n]) for n in ("whole trees in turn", "alternating leaves"))
    print(f"  median step, whole trees over alternating: {base / ours:.2f}x")


if __name__ == "__main__":
    main()
