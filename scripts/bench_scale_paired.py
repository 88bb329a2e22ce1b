#!/usr/bin/env python
"""Step cost against sequence length, as ratios of neighbouring steps in one process.

scripts/bench.py --scale times each length in its own process, a minute or more apart, and this
machine's speed moves by a third within minutes (its 2048^3 matmul rate: docs/benchmarks.md), so
its seconds per 1k tokens at 1024 against 256 came out anywhere from 0.87x to 1.31x across
sessions. Here one mlx-dpo LoRA engine (the bench's model, pairs, batch and settings) steps
through the lengths in turn, two steps at a time, each longer length between two of the base:

    256 256, 512 512, 256 256, 1024 1024, 256 256, 512 512, 256 256, ...

The second step of each two is the one timed (the first shows what a change of length costs:
buffers of another size, another compiled trace), and a longer length's seconds per 1k tokens is
divided by the mean of its two neighbours' at the base length. A change in the machine's speed
that lasts longer than those six steps (~40 s at 1024) cancels in the ratio. Prints, per length,
the median, min and max of the ratios, a distribution-free confidence interval of at least 90%
for their median (bench_report.median_interval: with 8 cycles the 2nd and 7th sorted ratios, 93%),
its median seconds per 1k tokens and matmul GFLOP/s (bench.step_flops) and the change-of-length
cost, and writes them to WORK/scale-paired.json.

    .venv/bin/python scripts/bench_scale_paired.py --cycles 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import base_spec, default_model, step_flops  # noqa: E402
from bench_report import median_interval  # noqa: E402
from bench_runners import faulted_step, mlx_dpo_lengths, token_counts  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="mlx-lm model folder (default: the bench's SmolLM2-135M-Instruct)")
    p.add_argument("--work", default=".bench", help="scratch folder, as scripts/bench.py's")
    p.add_argument("--lengths", default="256,512,1024", help="tokens per sequence; the first is the base")
    p.add_argument("--batch", type=int, default=4,
                   help="pairs per step (default 4: mlx-dpo's training.batch_size, as scripts/bench.py's table)")
    p.add_argument("--cycles", type=int, default=8, help="ratios per longer length (~1 min per cycle)")
    return p.parse_args()


def main() -> None:
    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)

    args = parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else default_model(work)
    config = json.loads((model / "config.json").read_text())
    lengths = [int(n) for n in args.lengths.split(",")]
    base, longer = lengths[0], lengths[1:]
    specs = {seq: {**base_spec(work, model, seq, args.batch, 0, 0), "finetune": "lora"} for seq in lengths}
    engine, grouped = mlx_dpo_lengths(specs)  # one engine for every length
    batches = {seq: [(batch, step_flops(config, token_counts(group), "lora")) for group, batch in zip(*grouped[seq])]
               for seq in lengths}
    taken = {seq: 0 for seq in lengths}
    faults = {seq: [] for seq in lengths}  # minor page faults of each step (memory given back and taken again)

    def step(seq: int) -> tuple[float, float]:
        """(seconds per 1k tokens, GFLOP/s) of one step at this length."""
        batch, flops = batches[seq][taken[seq] % len(batches[seq])]
        taken[seq] += 1
        seconds, faulted = faulted_step(engine, batch, specs[seq]["lr"])
        faults[seq].append(faulted)
        return 1000 * seconds / batch.num_tokens, flops / seconds / 1e9

    for seq in lengths:  # warm-up: tracing, compilation, buffers
        step(seq)
    # Each length runs two steps in a row; the second ("settled") is the one compared, the first
    # shows what changing length costs (buffers of another size, another compiled trace).
    ratios = {seq: [] for seq in longer}
    settled = {seq: [] for seq in lengths}
    switch = {seq: [] for seq in lengths}
    rates = {seq: [] for seq in lengths}

    def twice(seq: int) -> float:
        first, _ = step(seq)
        cost, rate = step(seq)
        switch[seq].append(first / cost)
        settled[seq].append(cost)
        rates[seq].append(rate)
        return cost

    before = twice(base)
    for cycle in range(args.cycles):
        for seq in longer:
            cost = twice(seq)
            after = twice(base)
            ratios[seq].append(cost / ((before + after) / 2))
            before = after
        print(f"cycle {cycle + 1}/{args.cycles}: " + ", ".join(f"{seq}: {ratios[seq][-1]:.3f}x" for seq in longer),
              flush=True)
    result = {"started": started, "command": f"scripts/bench_scale_paired.py --batch {args.batch} --cycles {args.cycles}",
              "batch": args.batch, "cycles": args.cycles, "base": base, "lengths": {}}
    for seq in lengths:
        row = {"median_s_per_ktoken": statistics.median(settled[seq]), "steps": len(settled[seq]),
               "median_gflops_per_s": statistics.median(rates[seq]),
               "median_switch_cost": statistics.median(switch[seq]),
               "median_page_faults": statistics.median(faults[seq][1:])}  # after its warm-up step
        if seq in ratios:
            r = ratios[seq]
            row.update(ratios=r, median_ratio=statistics.median(r), min_ratio=min(r), max_ratio=max(r))
            interval = median_interval(r)
            if interval:
                row.update(interval=interval[:2], interval_coverage=interval[2])
        result["lengths"][str(seq)] = row
        line = (f"seq {seq}: {row['median_s_per_ktoken']:.3f} s per 1k tokens, {row['median_gflops_per_s']:.1f} GFLOP/s, "
                f"first step after a change of length {row['median_switch_cost']:.3f}x the second, "
                f"{row['median_page_faults']:.0f} page faults per step")
        if seq in ratios:
            line += (f"; against its neighbours at {base}: median {row['median_ratio']:.3f}x "
                     f"(min {row['min_ratio']:.3f}x, max {row['max_ratio']:.3f}x, {len(r)} steps")
            if "interval" in row:
                low, high = row["interval"]
                line += f"; {row['interval_coverage']:.0%} interval for the median {low:.3f}x-{high:.3f}x"
            line += ")"
        print(line)
    (work / "scale-paired.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
