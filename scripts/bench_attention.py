#!/usr/bin/env python
"""One LoRA DPO step of mlx-dpo at a given sequence length, timed in one process for several
`compute.attention_block` values (0 = dense attention), on the bench's model and pairs.

    .venv/bin/python scripts/bench_attention.py SEQ BATCH BLOCKS [REPEATS] [BLOCKED_FROM]
    .venv/bin/python scripts/bench_attention.py 2048 2 0,256 1

Blocks are used at every length here (cpu_attention.BLOCKED_FROM = 0) unless BLOCKED_FROM is
given, so that each block size is what is measured; in training they start at 1024 x 1024
scores per layer (`default` keeps that).
Reference log-probs are fixed numbers attached to the pairs (what the cache would hold), so
only the training step is timed; run scripts/bench.py once first (it converts the model).
Prints, per block value, the first step (tracing included), the later steps and MLX's peak.
FINETUNE=full in the environment times full fine-tuning instead of LoRA.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import bench_runners  # noqa: E402
import numpy as np  # noqa: E402

import mlx_dpo  # noqa: E402, F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx_dpo import cpu_attention, refcache  # noqa: E402
from mlx_dpo.config import config_from_dict  # noqa: E402
from mlx_dpo.data.batching import collate  # noqa: E402
from mlx_dpo.data.pipeline import prepare_data  # noqa: E402
from mlx_dpo.engines.mlx_engine import MLXEngine  # noqa: E402


def main() -> None:
    seq, batch, blocks = int(sys.argv[1]), int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    work = bench.ROOT / ".bench"
    spec = bench.base_spec(work, work / "smollm2-135m-instruct", seq, batch, steps=repeats, warmup=1)
    cfg = config_from_dict(bench_runners._mlx_dpo_config({**spec, "finetune": os.environ.get("FINETUNE", "lora")}, {}), source="bench")
    engine = MLXEngine(cfg)
    threshold = sys.argv[5] if len(sys.argv) > 5 else "0"
    if threshold != "default":
        cpu_attention.BLOCKED_FROM = int(threshold)
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs[:batch]
    refcache.attach(pairs, np.full((batch, 2), -300.0))
    step_batch = collate(pairs, engine.tokenizer.eos_token_id)
    print(f"seq {seq}, batch {batch}: {step_batch.num_tokens} tokens per step", flush=True)
    for block in blocks:
        cfg.compute.attention_block = block
        engine.fast._compiled.clear()
        mx.reset_peak_memory()
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            engine.forward_backward(step_batch, batch)
            engine.apply_update(1e-6)
            times.append(time.perf_counter() - start)
        print(f"attention_block {block}: first {times[0]:.2f} s, then {', '.join(f'{t:.2f}' for t in times[1:])} s; "
              f"peak MLX {mx.get_peak_memory() / 2**30:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
