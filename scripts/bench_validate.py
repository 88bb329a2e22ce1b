#!/usr/bin/env python
"""Benchmark `mlx-dpo data validate` on N synthetic pairs of about 1 KB against HumanEval.

The pairs are written once (deterministic from --seed); each repeat runs the real CLI in a
fresh process (`mlx-dpo data validate FILE --benchmark humaneval --json`), so the time
includes start-up, reading, every check and the report. Prints min / median wall time, and
the CPU time of the run (user + system), which other work on a shared machine disturbs less.

Text is drawn from a Zipf distribution over HumanEval's own vocabulary plus synthetic words,
so many windows consist of benchmark words and the n-gram matcher works on its hard case;
--leak of the pairs get a 30-word passage of a HumanEval problem and must all be found.

    python scripts/bench_validate.py                  # 100,000 pairs, 3 repeats
    python scripts/bench_validate.py --pairs 10000 --repeats 5
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def vocabulary(rng: random.Random, problems: list[dict]) -> list[str]:
    words = {w for p in problems for w in p["prompt"].replace("\n", " ").split() if w.isalpha()}
    synthetic = {"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                 for _ in range(3000)}
    vocab = sorted(words | synthetic)
    rng.shuffle(vocab)
    return vocab


def sentence_maker(rng: random.Random, vocab: list[str]):
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(vocab))))  # Zipf, s = 1

    def text(chars: int) -> str:
        out, size = [], 0
        while size < chars:
            words = rng.choices(vocab, cum_weights=cumulative, k=12)
            out.append(" ".join(words).capitalize() + ".")
            size += len(out[-1]) + 1
        return " ".join(out)

    return text


def write_pairs(path: Path, n: int, leak_share: float, seed: int) -> int:
    from mlx_dpo.data.benchmarks import humaneval_path

    problems = [json.loads(line) for line in gzip.open(humaneval_path(), "rt")]
    rng = random.Random(seed)
    text = sentence_maker(rng, vocabulary(rng, problems))
    leaked = 0
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            row = {"prompt": text(220), "chosen": text(420), "rejected": text(260),
                   "score_chosen": rng.choice([7, 8, 9, 10]), "score_rejected": rng.choice([2, 3, 4, 5, 6])}
            if rng.random() < leak_share:
                words = rng.choice(problems)["prompt"].split()
                start = rng.randrange(max(1, len(words) - 30))
                row["chosen"] += " " + " ".join(words[start:start + 30])
                leaked += 1
            handle.write(json.dumps(row) + "\n")
    return leaked


def breakdown(path: Path, repeats: int) -> None:
    """Time each stage of validation in this process (min over repeats), per the whole file."""
    from mlx_dpo.data.benchmarks import load_benchmarks
    from mlx_dpo.data.conflicts import PairIndex
    from mlx_dpo.data.decontamination import contaminated_pairs
    from mlx_dpo.data.gap import AnnotationGap
    from mlx_dpo.data.keys import fast_key
    from mlx_dpo.data.lengths import CharLengths
    from mlx_dpo.data.quality import CHUNK
    from mlx_dpo.data.records import iter_records

    pairs = list(iter_records(path))
    index = load_benchmarks(["humaneval"])

    def identities():
        found = PairIndex()
        for p in pairs:
            found.add(fast_key(p.prompt), fast_key(p.chosen), fast_key(p.rejected), p.line)
        found.conflicts()

    def gap_and_lengths():
        gap, lengths = AnnotationGap(), CharLengths()
        for p in pairs:
            gap.add(p.extra, p.line)
            lengths.add(p)
        lengths.stats.summary()

    stages = {"read + schema (records.py)": lambda: list(iter_records(path)),
              "decontamination": lambda: [contaminated_pairs(index, pairs[i:i + CHUNK])
                                          for i in range(0, len(pairs), CHUNK)],
              "identities + conflicts": identities, "gap + lengths": gap_and_lengths}
    for name, stage in stages.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            stage()
            times.append(time.perf_counter() - start)
        print(f"  {name:<28} min {min(times):.2f} s, median {statistics.median(times):.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--leak", type=float, default=0.005, help="share of pairs given a HumanEval passage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the pairs here and keep them")
    parser.add_argument("--breakdown", action="store_true", help="also time each stage in-process")
    args = parser.parse_args()

    folder = tempfile.TemporaryDirectory()
    path = args.keep or Path(folder.name) / "pairs.jsonl"
    leaked = write_pairs(path, args.pairs, args.leak, args.seed)
    size_mb = path.stat().st_size / 1e6
    print(f"{args.pairs} pairs, {size_mb:.1f} MB ({size_mb * 1e3 / args.pairs:.2f} KB/pair), "
          f"{leaked} with a HumanEval passage; {os.cpu_count()} CPUs")
    command = [sys.executable, "-c", "from mlx_dpo.cli import main; main()",
               "data", "validate", str(path), "--benchmark", "humaneval", "--json"]
    times, cpu = [], []
    for repeat in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode not in (0, 1):
            print(done.stderr, file=sys.stderr)
            return 2
        report = json.loads(done.stdout)
        found = len(report["decontamination_detail"]["contaminated"])
        print(f"  run {repeat + 1}: {times[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU  "
              f"(pairs {report['total_pairs']}, gap {report['avg_gap']:.4f}, "
              f"decontamination {report['decontamination']:.4f}, contaminated {found})")
        if found < leaked:
            print(f"error: {leaked} leaked pairs, only {found} found", file=sys.stderr)
            return 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"data validate, {args.pairs} pairs: wall min {min(times):.2f} s, median {statistics.median(times):.2f} s; "
          f"CPU min {min(cpu):.2f} s, median {statistics.median(cpu):.2f} s over {args.repeats} runs "
          f"(load average {load:.1f})")
    if args.breakdown:
        breakdown(path, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
