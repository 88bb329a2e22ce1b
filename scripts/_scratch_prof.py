#!/usr/bin/env python
"""Where an mlx-dpo step's CPU time goes, by `perf` samples, on the bench's model and pairs.

    .venv/bin/python scripts/profile_step.py [--seq 256] [--batch 2] [--seconds 20] [--finetune lora] [--top N]

Builds the step as scripts/bench.py's mlx-dpo rows do (cached reference, every technique on),
runs two warm-up steps (tracing), then samples every thread with `perf record` for --seconds
while steps run, and prints each category's share of the samples: OpenBLAS's GEMM kernel, the
rest of OpenBLAS (packing, small-matrix paths), memset, MLX's compiled (fused) elementwise
kernels, its other ops, mlx-dpo's C++ kernels (native.py), allocation, the OS. Needs Linux `perf`; run scripts/bench.py once first
(it converts the model and writes the pairs).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import bench_runners  # noqa: E402

CATEGORIES = [  # (name, test on (shared object, symbol)), first match wins
    ("OpenBLAS GEMM kernel", lambda dso, sym: "sgemm_kernel" in sym),
    ("OpenBLAS packing and other GEMM paths", lambda dso, sym: "openblas" in dso),
    ("memset", lambda dso, sym: "memset" in sym),
    # mx.compile's kernels: a shared object per kernel, named after it (lib<kernel name>.so)
    ("MLX compiled (fused) elementwise kernels", lambda dso, sym: dso.startswith("lib") and sym[:12] in dso),
    ("mlx-dpo's C++ kernels", lambda dso, sym: dso.startswith("_native")),  # before "Python": _native.cpython-*.so
    ("MLX elementwise ops", lambda dso, sym: "libmlx" in dso and ("binary_op" in sym or "unary_op" in sym
                                                                 or "ternary_op" in sym)),
    ("MLX reductions", lambda dso, sym: "libmlx" in dso and "reduction" in sym),
    ("MLX copies", lambda dso, sym: "libmlx" in dso and "copy" in sym),
    ("MLX scheduling and other", lambda dso, sym: "libmlx" in dso),
    ("allocation (malloc/free)", lambda dso, sym: "libc" in dso and ("alloc" in sym or "free" in sym
                                                                     or sym.startswith("_int_"))),
    ("OS kernel (scheduling, page faults)", lambda dso, sym: "kernel" in dso),
    ("Python", lambda dso, sym: "python" in dso),
]


def categorize(report: str) -> dict[str, float]:
    shares: dict[str, float] = defaultdict(float)
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith("%") or line.lstrip().startswith("#"):
            continue
        share, dso, sym = float(parts[0][:-1]), parts[1], " ".join(parts[3:])
        name = next((n for n, test in CATEGORIES if test(dso, sym)), "other")
        shares[name] += share
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--finetune", choices=["lora", "full"], default="lora")
    p.add_argument("--top", type=int, default=0, help="also print the N symbols with the most samples")
    args = p.parse_args()

    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
    from mlx_dpo.config import config_from_dict
    from mlx_dpo.engines.mlx_engine import MLXEngine

    work = bench.ROOT / ".bench"
    spec = bench.base_spec(work, bench.default_model(work), args.seq, args.batch, steps=0, warmup=0)
    spec["finetune"] = args.finetune
    cfg = config_from_dict(bench_runners._mlx_dpo_config(spec, {}), source="profile")
    engine = MLXEngine(cfg)
    _, batches, _ = bench_runners.mlx_dpo_batches(engine, cfg, args.batch)  # reference log-probs attached

    def step(i: int) -> float:
        return bench_runners.timed_step(engine, batches[i % len(batches)], spec["lr"])

    for i in range(2):
        step(i)
    out = Path("/tmp/perf-full.data")
    perf = subprocess.Popen(["perf", "record", "-g", "--call-graph", "dwarf,16384", "-F", "299", "-p", str(os.getpid()), "-o", str(out), "--",
                             "sleep", str(args.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times, i = [], 2
    while perf.poll() is None:
        times.append(step(i))
        i += 1
    report = subprocess.run(["perf", "report", "-i", str(out), "--no-children", "--sort", "dso,symbol", "-S", "__memset_avx512_unaligned_erms", "-G", "--stdio"],
                            capture_output=True, text=True, check=True).stdout
    print(f"mlx-dpo {args.finetune}, seq {args.seq}, batch {args.batch}: {len(times)} steps sampled, "
          f"median {statistics.median(times):.2f} s/step")
    print(report[:20000]); return
    for name, share in categorize(report).items():
        print(f"{share:6.1f}%  {name}")
    if args.top:
        print(f"top {args.top} symbols:")
        rows = [line for line in report.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        for line in rows[:args.top]:
            print("  " + " ".join(line.split())[:160])


if __name__ == "__main__":
    main()
