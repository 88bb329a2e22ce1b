#!/usr/bin/env python
"""Length grouping and padding to a multiple of 16, each switched off, over an epoch of pairs of varied lengths.

mlx-dpo orders an epoch with `data.batching.epoch_order` (pairs sorted inside groups of 32
batches by `grouping_keys`: for the shared-prompt layout, by the longer completion's padded width,
then the prompt's length; then the batches shuffled) and rounds every padded width up to a multiple of 16
(`data.batching.PAD_MULTIPLE` for the batch, `completion.PAD_MULTIPLE` for the shared-prompt
grid that the step computes on). Grouping cuts padding; the multiple cuts the number of distinct
shapes, each of which costs `mx.compile` a new trace. This times whole epochs of mlx-dpo LoRA
steps, the traces included, on pairs whose prompt and completion lengths vary independently:

    grouped/16   mlx-dpo's default
    length/16    grouped by total length (prompt + longer completion), the key before session 15
    random/16    no grouping (groups of one batch: batches of random pairs)
    grouped/1    exact widths (no rounding up)
    random/1     both off (only when asked for with --variants)

Each variant runs in its own process (its own traces, clean peak memory), `--rounds` times
interleaved so that the machine's load falls on all alike. The reference log-probs are computed
before the epoch and not timed (the same for every variant). An untimed run of two steps first
fills MLX's kernel cache ($TMPDIR/mlx), so that no variant pays for building the step's kernels
with g++ (a one-off per machine; scripts/probe_jit_kernels.py measures it).

    python scripts/bench_batching.py --rounds 2
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("grouped/16", "length/16", "random/16", "grouped/1", "random/1")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="mlx-lm model folder (default: bench.py's SmolLM2-135M-Instruct)")
    p.add_argument("--work", default=str(ROOT / ".bench"), help="scratch folder (shared with bench.py)")
    p.add_argument("--pairs", type=int, default=64, help="pairs in the epoch (64 = one group at batch 2)")
    p.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every variant")
    p.add_argument("--variants", default=",".join(VARIANTS[:4]),
                   help=f"comma-separated variants to run, of {', '.join(VARIANTS)}")
    p.add_argument("--run-variant", help=argparse.SUPPRESS)  # internal: one variant, in this process
    return p.parse_args()


def make_varied_pairs(path: Path, n: int, seed: int = 0) -> None:
    """Prompts of 8-160 words and completions of 8-224 words, drawn independently."""
    from bench import WORDS

    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = [{"prompt": text(8, 160), "chosen": text(8, 224), "rejected": text(8, 224)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_variant(spec: dict) -> dict:
    """One epoch of LoRA steps with the variant's ordering and padding; returns times and shapes."""
    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx

    from bench_runners import _mlx_dpo_config
    from mlx_dpo import completion, refcache
    from mlx_dpo.config import config_from_dict
    from mlx_dpo.data import batching
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines.mlx_engine import MLXEngine

    order, multiple = spec["variant"].split("/")
    # Module constants read at call time: the two techniques switched off for this process only.
    batching.PAD_MULTIPLE = completion.PAD_MULTIPLE = int(multiple)
    if order == "random":
        batching.GROUP_FACTOR = 1  # each batch sorted alone: random pairs side by side
    cfg = config_from_dict(_mlx_dpo_config(spec, {}), source="bench_batching")
    engine = MLXEngine(cfg)
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs
    refcache.attach(pairs, refcache.compute(engine, pairs, spec["batch"]))
    pad = engine.tokenizer.eos_token_id or 0
    keys = [p.length for p in pairs] if order == "length" else batching.grouping_keys(pairs, shared_prompt=True)
    batches = [batching.collate([pairs[i] for i in idx], pad)
               for idx in batching.epoch_order(keys, spec["batch"], seed=0, epoch=0)]
    batches = batches[:spec.get("max_batches")]  # the warm-up run takes two
    shapes, grid, real = set(), 0, 0
    for b in batches:
        plan = completion.make_plan(b, shared=True)  # what the step computes on
        shapes.add(plan.prompts.shape + plan.continuation.shape)
        grid += plan.prompts.size + plan.continuation.size
        real += int(plan.weights.sum()) - 2 * b.num_pairs  # completion inputs (the last token is only predicted)
    real += sum(len(p.prompt) for p in pairs)
    mx.reset_peak_memory()
    steps = []
    start = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        engine.forward_backward(b, b.num_pairs)
        engine.apply_update(spec["lr"])
        steps.append(time.perf_counter() - t)
    epoch = time.perf_counter() - start
    return {"epoch_s": epoch, "step_s": steps, "steps": len(batches), "shapes": len(shapes),
            "grid_tokens": grid, "real_tokens": real, "peak_mlx_gb": mx.get_peak_memory() / 2**30}


def run_in_child(variant: str, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--run-variant", json.dumps({**spec, "variant": variant})]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BATCHING_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"bench_batching.py: {variant} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-1500:]}")
    return json.loads(line.split(" ", 1)[1])


def report(variants: list[str], runs: dict, pairs: int) -> str:
    lines = ["| variant | epoch s (min / median) | pairs/s (median) | vs grouped/16 | computed tokens | "
             "padding | distinct shapes | first step s | other steps s (median) | peak MLX GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = statistics.median(r["epoch_s"] for r in runs["grouped/16"]) if "grouped/16" in runs else None
    for v in variants:
        rs = runs[v]
        med = statistics.median(r["epoch_s"] for r in rs)
        first = statistics.median(r["step_s"][0] for r in rs)
        rest = statistics.median(s for r in rs for s in r["step_s"][1:])
        r0 = rs[0]
        ratio = f"{med / base:.2f}x" if base else "—"
        lines.append(f"| {v} | {min(r['epoch_s'] for r in rs):.1f} / {med:.1f} | {pairs / med:.3f} | {ratio} | "
                     f"{r0['grid_tokens']} | {1 - r0['real_tokens'] / r0['grid_tokens']:.1%} | {r0['shapes']} | "
                     f"{first:.2f} | {rest:.2f} | {max(r['peak_mlx_gb'] for r in rs):.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.run_variant:
        print("BATCHING_RESULT " + json.dumps(run_variant(json.loads(args.run_variant))), flush=True)
        return
    from bench import default_model

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"bench_batching.py: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else default_model(work)
    data = work / f"pairs-varied-{args.pairs}.jsonl"
    make_varied_pairs(data, args.pairs)
    spec = {"model": str(model), "data": str(data), "batch": args.batch, "lr": 1e-6, "lora_rank": 8,
            "lora_scale": 20.0, "max_prompt": 512, "max_completion": 512, "cache_dir": str(work / "scratch"),
            "finetune": "lora"}
    print("warm-up: two untimed steps fill MLX's kernel cache", flush=True)
    run_in_child(variants[0], {**spec, "max_batches": 2})
    runs: dict = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for v in variants:
            print(f"round {rnd + 1}/{args.rounds}: {v}", flush=True)
            runs[v].append(run_in_child(v, spec))
            r = runs[v][-1]
            print(f"  epoch {r['epoch_s']:.1f} s, {r['steps']} steps, {r['shapes']} shapes", flush=True)
    (work / "results-batching.json").write_text(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M"),
                                                            "args": vars(args), "runs": runs}, indent=2))
    print(report(variants, runs, args.pairs))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
