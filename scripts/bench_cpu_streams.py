#!/usr/bin/env python
"""How mlx-dpo uses its CPU streams (engines/cpu_streams.py), timed side by side in one process.

Two measurements on the bench's model and pairs (scripts/bench.py; run it once first, it converts
the model and writes the pairs):

    .venv/bin/python scripts/bench_cpu_streams.py order [--finetune lora|full] [--steps 8]
    .venv/bin/python scripts/bench_cpu_streams.py reference [--pairs 8] [--repeats 3]

`order` times the training step (cached reference, every technique on) with the two parts'
gradient leaves handed to `mx.eval` alternately (what mlx-dpo does,
`cpu_streams.alternating_leaves`) and with each part's tree whole, one after the other (before
session 16), the two orders alternating step by step; it prints each order's min / median seconds
per step and how many cores the process kept busy (CPU time over wall time, median over steps).

`reference` times the one-off reference pass (refcache.compute, batches of 2 pairs as in the
bench) with each batch's pairs split over the CPU streams (mlx-dpo since session 16) and on one
stream (`compute.cpu_streams: 1`, before), alternating, and prints min / median seconds per pair.

Their figures are in docs/benchmarks.md (session 16).
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


def config(finetune: str, steps: int, **compute):
    from mlx_dpo.config import config_from_dict

    work = bench.ROOT / ".bench"
    spec = bench.base_spec(work, bench.default_model(work), 256, 2, steps=steps, warmup=1)
    cfg = config_from_dict(bench_runners._mlx_dpo_config({**spec, "finetune": finetune}, {}), source="bench")
    for key, value in compute.items():
        setattr(cfg.compute, key, value)
    return cfg


def order(args) -> None:
    import numpy as np

    from mlx_dpo import refcache
    from mlx_dpo.data.batching import collate
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines import cpu_streams, mlx_engine

    cfg = config(args.finetune, args.steps)
    engine = mlx_engine.MLXEngine(cfg)
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs[:2]
    refcache.attach(pairs, np.full((2, 2), -300.0))  # fixed numbers: only the step is timed
    batch = collate(pairs, engine.tokenizer.eos_token_id)

    orders = {"alternating leaves": cpu_streams.alternating_leaves,
              "whole trees in turn": lambda trees: list(trees)}
    times: dict[str, list[float]] = {name: [] for name in orders}
    busy: dict[str, list[float]] = {name: [] for name in orders}
    for round_ in range(args.steps + 1):
        for name in (list(orders) if round_ % 2 else list(orders)[::-1]):
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


def reference(args) -> None:
    from mlx_dpo import refcache
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines.mlx_engine import MLXEngine

    cfg = config("lora", 1)
    variants = {"split over the streams": MLXEngine(cfg),
                "one stream": MLXEngine(config("lora", 1, cpu_streams=1))}
    engine = variants["split over the streams"]
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs
    pairs = (pairs * (args.pairs // len(pairs) + 1))[:args.pairs]
    times: dict[str, list[float]] = {name: [] for name in variants}
    values = {}
    for round_ in range(args.repeats + 1):
        for name in (list(variants) if round_ % 2 else list(variants)[::-1]):
            start = time.perf_counter()
            values[name] = refcache.compute(variants[name], pairs, 2)
            if round_:  # the first round builds kernels and warms up
                times[name].append((time.perf_counter() - start) / len(pairs))
    gap = abs(values["split over the streams"] - values["one stream"]).max()
    print(f"reference pass, LoRA model, {len(pairs)} pairs in batches of 2, {args.repeats} repeats, alternating "
          f"(largest difference between the two: {gap:.2g})")
    for name in variants:
        print(f"  {name:24s} min {min(times[name]):.3f} s/pair, median {statistics.median(times[name]):.3f} s/pair")
    base, ours = (statistics.median(times[n]) for n in ("one stream", "split over the streams"))
    print(f"  median, one stream over split: {base / ours:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("order", help="the order of the gradient parts handed to mx.eval")
    o.add_argument("--finetune", choices=["lora", "full"], default="full")
    o.add_argument("--steps", type=int, default=8, help="timed steps per order (after one untimed round)")
    r = sub.add_parser("reference", help="the reference pass split over the streams or on one")
    r.add_argument("--pairs", type=int, default=8)
    r.add_argument("--repeats", type=int, default=3, help="timed passes per variant (after one untimed round)")
    args = p.parse_args()
    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)

    if args.what == "order":
        order(args)
    else:
        reference(args)


if __name__ == "__main__":
    main()
