#!/usr/bin/env python
"""Training throughput of the engines side by side: mlx-dpo's MLX engine, its PyTorch engine
(the CUDA fallback), and TRL's DPOTrainer as the peer, on the same model, data and batch.

Each side runs in its own process, sides alternate within every repeat, and each reports the
median seconds of its timed optimizer steps (after warm-up steps); the summary gives min and
median over repeats of pairs/s, and each side's ratio to TRL. TRL needs `trl` and `peft`,
which mlx-dpo does not depend on: point --trl-python at an interpreter that has them.

  python scripts/bench_backends.py --sides mlx,torch,trl --trl-python /path/to/venv/bin/python
  python scripts/bench_backends.py --device cuda --sides torch,trl --hidden 2048 --layers 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_assets(folder: Path, args) -> tuple[Path, Path]:
    """A random llama (mlx-lm and transformers format) with a word-level tokenizer, and pairs
    whose prompt and answers are exact token counts (one word = one token)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = folder / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(args.vocab - 3)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(model_dir)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=args.hidden,
                  num_hidden_layers=args.layers, intermediate_size=args.hidden * 11 // 4,
                  num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
                  rms_norm_eps=1e-5, vocab_size=args.vocab, rope_theta=10000.0, max_position_embeddings=4096,
                  tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    say = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    data = folder / "pairs.jsonl"
    with data.open("w") as f:
        for _ in range(args.batch * (args.warmup + args.steps) * 2):
            row = {"prompt": say(args.prompt_tokens), "chosen": say(args.response_tokens - 1),
                   "rejected": say(args.response_tokens - 1)}  # + EOS = response_tokens
            f.write(json.dumps(row) + "\n")
    return model_dir, data


# -- workers: one side, one process -----------------------------------------------------------
def worker_mlx_dpo(args, engine_name: str) -> dict:
    import mlx_dpo  # noqa: F401  (runtime preparation before mlx loads)
    from mlx_dpo.config import config_from_dict
    from mlx_dpo.data.batching import collate
    from mlx_dpo.data.pipeline import prepare_data
    from mlx_dpo.engines import make_engine, select_device

    cfg = config_from_dict({
        "model": {"base_model": args.model, "finetune": args.finetune, "lora_rank": 8},
        "data": {"train_file": args.data, "max_prompt_length": 4096, "max_response_length": 4096},
        "training": {"learning_rate": 1e-5, "batch_size": args.batch},
        "optimization": {"lr_scheduler": "constant"},
        "compute": {"engine": engine_name, "device": args.device},
        "logging": {"output_dir": tempfile.mkdtemp()}})
    engine = make_engine(cfg, select_device(cfg))
    pairs = prepare_data(cfg, engine.tokenizer).train.pairs
    times, cpu, tokens = [], [], 0
    for i in range(args.warmup + args.steps):
        batch = collate(pairs[i * args.batch:(i + 1) * args.batch], engine.tokenizer.eos_token_id)
        start, start_cpu = time.perf_counter(), time.process_time()
        engine.forward_backward(batch, batch.num_pairs)
        engine.apply_update(1e-5)  # returns Python floats: the step has finished computing
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            tokens = batch.num_tokens
    return {"step_seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu),
            "tokens_per_step": tokens, "peak_memory_gb": engine.peak_memory_gb()}


def worker_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self.start, self.start_cpu = [], [], 0.0, 0.0

        def on_step_begin(self, *a, **k):
            self._sync()
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self._sync()
            self.times.append(time.perf_counter() - self.start)
            self.cpu.append(time.process_time() - self.start_cpu)

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    peft_config = None
    if args.finetune == "lora":
        from peft import LoraConfig

        # mlx-dpo's LoRA: rank 8, scale 20 (= lora_alpha / r), every linear layer in the blocks
        peft_config = LoraConfig(r=8, lora_alpha=160, lora_dropout=0.0, target_modules="all-linear")
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                       max_steps=args.warmup + args.steps, learning_rate=1e-5, lr_scheduler_type="constant",
                       beta=0.1, max_length=4096, logging_steps=10_000, save_strategy="no", report_to=[],
                       use_cpu=args.device == "cpu", bf16=False, dataloader_num_workers=0, seed=0)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer, peft_config=peft_config,
                         train_dataset=load_dataset("json", data_files=args.data, split="train"),
                         callbacks=[timer])
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"step_seconds": statistics.median(timer.times[args.warmup:]),
            "cpu_seconds": statistics.median(timer.cpu[args.warmup:]),
            "tokens_per_step": 2 * args.batch * (args.prompt_tokens + args.response_tokens),
            "peak_memory_gb": peak}


# -- the driver ---------------------------------------------------------------------------------
def run_side(side: str, args, model: Path, data: Path) -> dict:
    python = args.trl_python if side == "trl" else sys.executable
    cmd = [python, __file__, "--worker", side, "--model", str(model), "--data", str(data)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("finetune", "batch", "steps", "warmup", "device", "prompt_tokens", "response_tokens")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"{side} failed:\n{run.stderr[-4000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["pairs_per_sec"] = args.batch / result["step_seconds"]
    return result


def main() -> None:
    args = parse_args()
    if args.worker:
        fn = worker_trl if args.worker == "trl" else lambda a: worker_mlx_dpo(a, args.worker)
        print(json.dumps(fn(args)))
        return
    sides = args.sides.split(",")
    folder = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    model, data = build_assets(folder, args)
    results = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotate the order
            results[side].append(run_side(side, args, model, data))
            print(f"repeat {r + 1} {side}: {results[side][-1]['pairs_per_sec']:.2f} pairs/s", file=sys.stderr)
    print(summary(results, args))


def summary(results: dict, args) -> str:
    rates = {s: [x["pairs_per_sec"] for x in rs] for s, rs in results.items()}
    lines = [f"{args.finetune}, batch {args.batch} pairs x ({args.prompt_tokens}+{args.response_tokens}) tokens, "
             f"llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, device {args.device}, "
             f"{args.steps} timed steps after {args.warmup}, {args.repeats} repeats",
             "| side | pairs/s best (min step time) | pairs/s median | vs TRL (median) | CPU s/step median | peak GB |",
             "|---|---|---|---|---|---|"]
    peer = statistics.median(rates["trl"]) if "trl" in rates else None
    for side, values in rates.items():
        med = statistics.median(values)
        ratio = f"{med / peer:.2f}x" if peer else "-"
        peak = max(x["peak_memory_gb"] for x in results[side])
        cpu = statistics.median(x["cpu_seconds"] for x in results[side])
        lines.append(f"| {side} | {max(values):.2f} | {med:.2f} | {ratio} | {cpu:.2f} | {peak:.2f} |")
    return "\n".join(lines)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="mlx,torch,trl", help="comma-separated: mlx, torch, trl")
    p.add_argument("--trl-python", default=sys.executable, help="interpreter with trl and peft installed")
    p.add_argument("--finetune", default="lora", choices=["lora", "full"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--response-tokens", type=int, default=128)
    p.add_argument("--worker", choices=["mlx", "torch", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
