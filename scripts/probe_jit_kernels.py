#!/usr/bin/env python
"""How many kernels MLX's CPU backend builds (with g++) for each new batch shape, and what it costs.

`mx.compile` on the CPU writes each fused elementwise kernel as C++, builds it with g++ and caches
the library in $TMPDIR/mlx under a name that includes the kernel's constants. A constant that
follows the batch's length therefore builds new kernels for every new length. This runs LoRA steps
of the bench's model on six batches of pairs of varied lengths (bench_batching.py's pairs) and
prints, per step, its time and the kernels it added to the cache. Give it an empty TMPDIR to
start from a cold cache:

    TMPDIR=$(mktemp -d) python scripts/probe_jit_kernels.py          # mlx-dpo as it is
    TMPDIR=$(mktemp -d) python scripts/probe_jit_kernels.py --old    # head chunks as before session 15

`--old` restores the LM head's former chunk widths, which followed the number of rows exactly.
A probe, not part of the package; its figures are in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def old_chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    from mlx_dpo import head_logps

    width = max(head_logps.CHUNK_BYTES // (4 * max(rows, 1)) // 32 * 32, head_logps.MIN_CHUNK)
    return [(first, min(first + width, vocab)) for first in range(0, vocab, width)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", action="store_true", help="the LM head's chunk widths before session 15")
    p.add_argument("--work", default=str(ROOT / ".bench"), help="bench.py's scratch folder (model, pairs)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
    from bench import default_model
    from bench_batching import make_varied_pairs
    from bench_runners import _mlx_dpo_config
    from mlx_dpo import head_logps, refcache
    from mlx_dpo.config import config_from_dict
    from mlx_dpo.data import batching
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines.mlx_engine import MLXEngine

    if args.old:
        head_logps._chunks = old_chunks
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs-varied-12.jsonl"
    make_varied_pairs(data, 12)
    cache = os.path.join(tempfile.gettempdir(), "mlx")

    def built() -> int:
        return len(glob.glob(os.path.join(cache, "*", "cpu", "*.so")))

    spec = {"model": str(default_model(work)), "data": str(data), "batch": 2, "lr": 1e-6, "lora_rank": 8,
            "lora_scale": 20.0, "max_prompt": 512, "max_completion": 512, "cache_dir": str(work / "scratch"),
            "finetune": "lora"}
    cfg = config_from_dict(_mlx_dpo_config(spec, {}), source="probe_jit_kernels")
    engine = MLXEngine(cfg)
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs
    start = time.perf_counter()
    refcache.attach(pairs, refcache.compute(engine, pairs, 2))
    print(f"kernel cache: {cache}; reference pass {time.perf_counter() - start:.1f} s, {built()} kernels built",
          flush=True)
    pad = engine.tokenizer.eos_token_id or 0
    for i in range(0, len(pairs), 2):
        batch = batching.collate(pairs[i:i + 2], pad)
        before, start = built(), time.perf_counter()
        engine.forward_backward(batch, batch.num_pairs)
        engine.apply_update(spec["lr"])
        completion = int(batch.mask.sum(axis=1).max())
        print(f"step {i // 2 + 1}: inputs {batch.inputs.shape}, longest completion {completion}: "
              f"{time.perf_counter() - start:.2f} s, {built() - before} new kernels", flush=True)


if __name__ == "__main__":
    main()
