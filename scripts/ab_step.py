"""A/B of one setting on the bench's mlx-dpo step, as ratios of neighbouring steps in one process.

Two engines are built side by side, B with the settings given: an upper-case NAME is an
environment variable (set while B's models load and its step is built), a lower-case one one of
the bench runner's mlx-dpo options (scripts/bench_runners.py, a JSON value); they step in turn, A B A B ...; each B step is divided by
the mean of the A steps either side of it, so that the machine's swings, which move its speed by
a third within minutes, cancel. Prints the median, min and max of those ratios, each engine's
median and min step time. (Memory is the bench's to measure: both engines share this process.)

    .venv/bin/python scripts/ab_step.py --b frozen_panels=true --steps 14 [--seq 256] [--finetune lora]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import base_spec, default_model  # noqa: E402
from bench_runners import _mlx_dpo_config, mlx_dpo_batches, timed_step  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", action="append", default=[], metavar="NAME=VALUE", help="B's setting (repeat)")
    p.add_argument("--model", help="mlx-lm model folder (default: the bench's SmolLM2-135M-Instruct)")
    p.add_argument("--work", default=".bench", help="scratch folder, as scripts/bench.py's")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence, roughly")
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--finetune", choices=("lora", "full"), default="lora")
    p.add_argument("--steps", type=int, default=12, help="timed steps of each engine")
    return p.parse_args()


def main() -> None:
    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
    from mlx_dpo.config import config_from_dict
    from mlx_dpo.engines.mlx_engine import MLXEngine

    args = parse_args()
    work = Path(args.work)
    model = Path(args.model) if args.model else default_model(work)
    spec = {**base_spec(work, model, args.seq, args.batch, 0, 0), "finetune": args.finetune}
    overrides = dict(item.split("=", 1) for item in args.b)
    env_b = {key: value for key, value in overrides.items() if key.isupper()}
    opts_b = {key: json.loads(value) for key, value in overrides.items() if not key.isupper()}
    engines, batches = {}, {}
    for name, env, opts in (("A", {}, {}), ("B", env_b, opts_b)):
        cfg = config_from_dict(_mlx_dpo_config(spec, opts), source="bench")
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        engines[name] = MLXEngine(cfg)
        _, batches[name], _ = mlx_dpo_batches(engines[name], cfg, args.batch)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    taken = {"A": 0, "B": 0}

    def step(name: str) -> float:
        batch = batches[name][taken[name] % len(batches[name])]
        taken[name] += 1
        return timed_step(engines[name], batch, spec["lr"])

    for name in engines:  # warm-up: tracing, compilation, buffers
        step(name)
        step(name)
    times = {"A": [step("A")], "B": []}
    for _ in range(args.steps):
        times["B"].append(step("B"))
        times["A"].append(step("A"))
    ratios = [b / ((times["A"][i] + times["A"][i + 1]) / 2) for i, b in enumerate(times["B"])]
    result = {"b": overrides, "seq": args.seq, "batch": args.batch, "finetune": args.finetune,
              "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
              "A": {"median_s": statistics.median(times["A"]), "min_s": min(times["A"])},
              "B": {"median_s": statistics.median(times["B"]), "min_s": min(times["B"])},
              "times": times}
    print(f"B ({' '.join(args.b) or 'same settings'}) against A, {args.finetune}, seq {args.seq}, batch {args.batch}: "
          f"step time ratio median {result['median_ratio']:.3f} (min {result['min_ratio']:.3f}, "
          f"max {result['max_ratio']:.3f}, {len(ratios)} steps); A {result['A']['median_s']:.2f} s "
          f"(min {result['A']['min_s']:.2f}), B {result['B']['median_s']:.2f} s (min {result['B']['min_s']:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
