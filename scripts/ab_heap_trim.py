"""A/B of glibc's heap trimming on the bench's mlx-dpo LoRA step when sequence lengths alternate.

One engine steps a seq-256 batch, then a seq-1024 batch, over and over, as length-bucketed
training does. A is glibc's largest positive trim threshold (2 GiB, mlx-dpo's setting before
session 23): the ~4 GB that a 1024-token step frees sits at the heap's top and is given back, and
the next long step faults it in again. B never trims (mlx-dpo's setting, hardware._keep_freed_heap).
The modes run in blocks of cycles, A B B A A B ..., switched with mallopt between blocks, so the
machine's slow swings hit both alike; each cycle prints seconds per 1k tokens at both lengths,
the 1024-token step's minor page faults, and the ratio of the two lengths within the cycle. The
medians leave out each block's first cycle: it still carries the other mode's heap.
Linux with glibc only.

    .venv/bin/python scripts/ab_heap_trim.py --pairs 4 [--cycles 2] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import base_spec, default_model  # noqa: E402
from bench_runners import faulted_step, mlx_dpo_lengths  # noqa: E402

LENGTHS = (256, 1024)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="pairs of mode blocks: A then B, then B then A, ...")
    p.add_argument("--cycles", type=int, default=2, help="cycles per mode block (the first is not counted)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--work", default=".bench", help="scratch folder, as scripts/bench.py's")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.cycles < 2 or args.pairs < 1:
        sys.exit("ab_heap_trim.py: --cycles must be at least 2 (each block's first is not counted), --pairs at least 1")
    # importing mlx_dpo loads OpenBLAS before mlx and sets mode B
    from mlx_dpo.hardware import M_TRIM_THRESHOLD, NEVER_TRIM, glibc_mallopt

    mallopt = glibc_mallopt()
    if mallopt is None:
        sys.exit("ab_heap_trim.py: needs glibc's mallopt")
    thresholds = {"A": 2**31 - 1, "B": NEVER_TRIM}
    work = Path(args.work)
    model = default_model(work)
    specs = {seq: {**base_spec(work, model, seq, args.batch, 0, 0), "finetune": "lora"} for seq in LENGTHS}
    engine, grouped = mlx_dpo_lengths(specs)
    batches = {seq: collated for seq, (_, collated) in grouped.items()}

    def step(seq: int, i: int) -> tuple[float, int]:
        """(seconds per 1k tokens, minor page faults) of one step."""
        batch = batches[seq][i % len(batches[seq])]
        seconds, faults = faulted_step(engine, batch, specs[seq]["lr"])
        return 1000 * seconds / batch.num_tokens, faults

    for seq in LENGTHS:  # warm-up: tracing, compilation, buffers
        step(seq, 0)
    kept = {mode: [] for mode in thresholds}
    for p in range(args.pairs):
        for mode in ("AB" if p % 2 == 0 else "BA"):
            if not mallopt(M_TRIM_THRESHOLD, thresholds[mode]):
                sys.exit("mallopt refused the trim threshold (not glibc?)")
            for cycle in range(args.cycles):
                short, _ = step(LENGTHS[0], cycle)
                long, faults = step(LENGTHS[1], cycle)
                if cycle:
                    kept[mode].append((short, long, long / short, faults))
                print(f"{mode} cycle {cycle}: {LENGTHS[0]}: {short:.3f} s per 1k tokens, {LENGTHS[1]}: {long:.3f} "
                      f"({faults} page faults), ratio {long / short:.3f}", flush=True)
    for mode, rows in kept.items():
        short, long, ratio, faults = (statistics.median(r[i] for r in rows) for i in range(4))
        print(f"{mode} (trim threshold {thresholds[mode]}), medians of {len(rows)} cycles: {LENGTHS[0]}: {short:.3f}, "
              f"{LENGTHS[1]}: {long:.3f} s per 1k tokens, ratio {ratio:.3f}, {faults:.0f} page faults per long step")


if __name__ == "__main__":
    main()
