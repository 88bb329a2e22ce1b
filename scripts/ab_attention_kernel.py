#!/usr/bin/env python
"""A/B of builds of mlx-dpo's C++ kernels on attention alone: scripts/bench_attention_kernel.py run
for each build in turn, ROUNDS times, each run in its own process; prints each build's min of the
runs' minima and median of their medians, forward and backward.

    cp ~/.cache/mlx-dpo/native/<hash>/_native*.so /tmp/before.so   # then edit, rebuild, copy again
    .venv/bin/python scripts/ab_attention_kernel.py 1846 5 /tmp/before.so /tmp/after.so

The machine's load moves single runs by 20-50%; alternating the builds spreads it over both.
"""
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"\d+ keys, (\w+): min ([\d.]+) ms, median ([\d.]+) ms")


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    keys, rounds, builds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    bench = Path(__file__).with_name("bench_attention_kernel.py")
    runs = defaultdict(list)  # (build, pass) -> [(min, median)]
    for round_ in range(rounds):
        for build in builds:
            out = subprocess.run([sys.executable, str(bench), keys, "21"], env={**os.environ, "MLX_DPO_NATIVE_SO": build},
                                 capture_output=True, text=True, check=True).stdout
            for name, low, mid in LINE.findall(out):
                runs[build, name].append((float(low), float(mid)))
        print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
    for (build, name), times in sorted(runs.items(), key=lambda item: (item[0][1], builds.index(item[0][0]))):
        print(f"{name:8s} {build}: min of minima {min(t[0] for t in times):.1f} ms, "
              f"median of medians {statistics.median(t[1] for t in times):.1f} ms ({len(times)} runs)")


if __name__ == "__main__":
    main()
