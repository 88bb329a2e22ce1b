#!/usr/bin/env python
"""Gradient exchange over MLX's ring: its time per training step and its share of the step.

Two ranks on 127.0.0.1 (two processes, MLX ring backend over TCP), the 65/35 split of an
8-pair global batch (smoke data, prompts and responses up to 64 tokens), fp32 on the CPU.
Models: the bundled tiny model, and a ~31M-parameter llama of the same tokenizer built here
with random weights. For each model and fine-tuning mode (LoRA, full), every rank runs
`--warmup` + `--repeats` steps of MLXEngine, and rank 0 measures per step:

  step       forward+backward, gradient exchange and update, as the trainer runs a step
  exchange   the all-sum of the gradients alone, started after a barrier (so waiting for
             the slower rank is not counted), as the engine issues it (distributed/exchange.py:
             tensors under 1 MiB packed into shared buffers, larger ones alone); and, for
             comparison, one all_sum per tensor. The two alternate which goes first.
  share      median exchange / median step

Both ranks share this machine's cores (one BLAS thread each); on two Macs each rank has its
own, so steps are shorter there and the exchange crosses a cable instead of loopback.

    python scripts/bench_distributed.py                 # table on stdout, JSON in .bench/
    python scripts/bench_distributed.py --write-docs    # also replaces its section of docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "mlx_dpo" / "assets" / "tiny-model"
SMOKE = ROOT / "mlx_dpo" / "assets" / "smoke" / "train.jsonl"
MID = dict(hidden_size=512, num_hidden_layers=9, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
           intermediate_size=1536)  # ~31M parameters with the tiny model's 512-token vocabulary
SPLIT = [0.65, 0.35]
GLOBAL_PAIRS = 8
DOC_BEGIN, DOC_END = "<!-- bench_distributed:begin -->", "<!-- bench_distributed:end -->"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocation)")
    p.add_argument("--work", default=str(ROOT / ".bench" / "distributed"), help="scratch folder")
    p.add_argument("--only", choices=["tiny", "31M"], help="one model only")
    p.add_argument("--write-docs", action="store_true", help="replace this benchmark's section of docs/benchmarks.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec: run as one rank
    return p.parse_args()


# -- one rank ---------------------------------------------------------------------------------
def worker(spec: dict) -> None:
    import mlx_dpo  # noqa: F401  (runtime preparation before mlx loads)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_dpo.config import config_from_dict
    from mlx_dpo.data.batching import collate, shard
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines.mlx_engine import MLXEngine

    group = mx.distributed.init(strict=True, backend="ring")
    cfg = config_from_dict({
        "model": {"base_model": spec["model"], "finetune": spec["finetune"], "lora_rank": 8},
        "data": {"train_file": str(SMOKE), "max_prompt_length": 64, "max_response_length": 64},
        "training": {"batch_size": GLOBAL_PAIRS // 2, "learning_rate": 1e-5, "precompute_reference": False},
        "logging": {"output_dir": spec["work"]}}, source="bench")
    engine = MLXEngine(cfg)
    engine.group = group
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs
    mine = shard(list(range(GLOBAL_PAIRS)), SPLIT, group.rank())
    batch = collate([pairs[i] for i in mine], engine.tokenizer.eos_token_id or 0)
    rows, tensors = measure_steps(engine, batch, group, spec["warmup"], spec["repeats"])
    if group.rank() == 0:
        trainable = sum(v.size for _, v in tree_flatten(engine.models.policy.trainable_parameters()))
        total = sum(v.size for _, v in tree_flatten(engine.models.policy.parameters()))
        if spec["finetune"] == "lora":
            total -= trainable
        print(json.dumps({"rows": rows, "trainable": trainable, "params": total, "pairs": len(mine),
                          "tensors": tensors}), flush=True)


def measure_steps(engine, batch, group, warmup: int, repeats: int) -> tuple[list[dict], int]:
    """Per timed step: the step, the engine's exchange, and one all_sum per tensor (seconds)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from mlx_dpo.distributed.exchange import sum_over_ranks

    def barrier():
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    rows = []
    for i in range(warmup + repeats):
        barrier()
        step = timed(lambda: engine.forward_backward(batch, GLOBAL_PAIRS))
        grads = engine._grads  # the accumulated gradients the update is about to exchange
        variants = {"exchange": lambda: mx.eval(sum_over_ranks(grads, group)),
                    "per_tensor": lambda: mx.eval(tree_map(lambda g: mx.distributed.all_sum(g, group=group), grads))}
        times = {}
        for name in sorted(variants, reverse=i % 2 == 1):  # alternate which goes first
            barrier()
            times[name] = timed(variants[name])
        step += timed(lambda: engine.apply_update(1e-5))
        if i >= warmup:
            rows.append({"step": step, **times})
    return rows, len(tree_flatten(grads))


# -- the orchestrator -------------------------------------------------------------------------
def build_mid_model(folder: Path) -> Path:
    """A random llama with MID's shape and the tiny model's tokenizer (built once)."""
    if (folder / "model.safetensors").exists():
        return folder
    import mlx_dpo  # noqa: F401
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder.mkdir(parents=True, exist_ok=True)
    config = {**json.loads((TINY / "config.json").read_text()), **MID}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((TINY / name).read_bytes())
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def free_base() -> int:
    """A port the OS just handed out (its neighbour is almost always free too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return min(s.getsockname()[1], 65000)


def run_pair(spec: dict, work: Path) -> dict:
    port = free_base()
    ring = work / "ring.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    procs = []
    for rank in range(2):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring), "OPENBLAS_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=3600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a rank failed ({spec['finetune']} on {spec['model']}):\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def summarize(name: str, finetune: str, result: dict) -> dict:
    ms = {k: [r[k] * 1000 for r in result["rows"]] for k in ("step", "exchange", "per_tensor")}
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"model": name, "finetune": finetune, "params": result["params"], "trainable": result["trainable"],
            "tensors": result["tensors"], "grad_mb": result["trainable"] * 4 / 2**20,
            **{f"{k}_min": min(v) for k, v in ms.items()}, **{f"{k}_median": med[k] for k in ms},
            "share": med["exchange"] / med["step"], "share_per_tensor": med["per_tensor"] / med["step"],
            "repeats": len(result["rows"]), "rank0_pairs": result["pairs"]}


def table(rows: list[dict]) -> str:
    lines = ["| model | mode | gradients | step ms (min / median) | exchange ms (min / median) | "
             "share of step | one all_sum per tensor: ms (min / median) | share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.2f}M) | {r['finetune']} | {r['trainable'] / 1e6:.3f}M "
                     f"({r['grad_mb']:.2f} MiB, {r['tensors']} tensors) | "
                     f"{r['step_min']:.1f} / {r['step_median']:.1f} | "
                     f"{r['exchange_min']:.2f} / {r['exchange_median']:.2f} | {100 * r['share']:.1f}% | "
                     f"{r['per_tensor_min']:.2f} / {r['per_tensor_median']:.2f} | {100 * r['share_per_tensor']:.1f}% |")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{DOC_BEGIN}\n{text}\n{DOC_END}"
    if DOC_BEGIN in doc:
        doc = doc[:doc.index(DOC_BEGIN)] + block + doc[doc.index(DOC_END) + len(DOC_END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = {"tiny": str(TINY), "31M": str(build_mid_model(work / "mid-model"))}
    if args.only:
        models = {args.only: models[args.only]}
    rows = []
    for name, path in models.items():
        for finetune in ("lora", "full"):
            spec = {"model": path, "finetune": finetune, "warmup": args.warmup, "repeats": args.repeats,
                    "work": str(work / "out")}
            rows.append(summarize(name, finetune, run_pair(spec, work)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print("\n" + text)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
