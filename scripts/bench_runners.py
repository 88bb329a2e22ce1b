#!/usr/bin/env python
"""One trainer's timed steps, in its own process (clean peak memory): called by scripts/bench.py.

    python scripts/bench_runners.py RUNNER SPEC_JSON  ->  one JSON line on stdout

RUNNER is mlx-dpo, mlx-lm-lora or trl. Every runner trains the same model on the same JSONL
pairs with the same batch (pairs per step), LoRA shape and learning rate, and reports the
wall time of each optimizer step after warm-up, the tokens it processed, and peak memory.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_pairs(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# -- mlx-dpo ---------------------------------------------------------------------------------
def _mlx_dpo_config(spec: dict, opts: dict) -> dict:
    """The bench spec as an mlx-dpo config (the same model, data, batch and LoRA shape as the peers)."""
    return {"model": {"base_model": spec["model"], "finetune": spec["finetune"], "lora_rank": spec["lora_rank"],
                     "lora_scale": spec["lora_scale"]},
           "data": {"train_file": spec["data"], "max_prompt_length": spec["max_prompt"],
                    "max_response_length": spec["max_completion"]},
           "training": {"learning_rate": spec["lr"], "batch_size": spec["batch"],
                        "share_prompt": opts.get("share_prompt", True),
                        "precompute_reference": opts.get("precompute_reference", True),
                        "reference_cache_dir": spec["cache_dir"]},
           "compute": {"compile": opts.get("compile", True), "cpu_streams": opts.get("cpu_streams", 0),
                       "fast_cpu_math": opts.get("fast_cpu_math", True),
                       "gradient_checkpointing": opts.get("gradient_checkpointing", False),
                       "recompute_activations": opts.get("recompute_activations", True),
                       "recompute_attention": opts.get("recompute_attention", False),
                       "frozen_panels": opts.get("frozen_panels", False)},
           "logging": {"output_dir": spec["cache_dir"]}}


def mlx_dpo_batches(engine, cfg, pairs_per_step: int) -> tuple[list, list, float]:
    """(groups of pairs, their collated batches, seconds of the reference pass) of cfg's training
    file, `pairs_per_step` per batch; the reference log-probs computed once and attached first when
    cfg precomputes them (else 0 seconds)."""
    from mlx_dpo import refcache
    from mlx_dpo.data.batching import collate
    from mlx_dpo.data.pipeline import prepare_data

    pairs = prepare_data(cfg, engine.tokenizer).train.pairs
    precompute_s = 0.0
    if cfg.training.precompute_reference:
        start = time.perf_counter()
        refcache.attach(pairs, refcache.compute(engine, pairs, pairs_per_step))
        precompute_s = time.perf_counter() - start
    pad = engine.tokenizer.eos_token_id or 0
    groups = [pairs[i:i + pairs_per_step] for i in range(0, len(pairs), pairs_per_step)]
    return groups, [collate(group, pad) for group in groups], precompute_s


def mlx_dpo_lengths(specs: dict) -> tuple[object, dict]:
    """One mlx-dpo engine for the bench's specs at several lengths ({seq: spec}), with the longest
    length's limits so that none of the shorter pairs is truncated, and each length's (groups of
    pairs, collated batches) at its spec's batch."""
    from mlx_dpo.config import config_from_dict
    from mlx_dpo.engines.mlx_engine import MLXEngine

    longest = max(specs)
    limits = {"max_prompt": longest, "max_completion": longest}
    engine = MLXEngine(config_from_dict(_mlx_dpo_config({**specs[longest], **limits}, {}), source="bench"))
    batches = {}
    for seq, spec in specs.items():
        cfg = config_from_dict(_mlx_dpo_config({**spec, **limits}, {}), source="bench")
        groups, collated, _ = mlx_dpo_batches(engine, cfg, spec["batch"])
        batches[seq] = (groups, collated)
    return engine, batches


def timed_step(engine, batch, lr: float) -> float:
    """Seconds of one mlx-dpo optimizer step on `batch` (forward, backward and update)."""
    start = time.perf_counter()
    engine.forward_backward(batch, batch.num_pairs)
    engine.apply_update(lr)
    return time.perf_counter() - start


def faulted_step(engine, batch, lr: float) -> tuple[float, int]:
    """(seconds, minor page faults) of one `timed_step`: the faults count memory the kernel had to
    hand over again (zero-filled) because it was given back since the last step."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = timed_step(engine, batch, lr)
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def token_counts(group: list) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) tokens of each pair: what bench.step_flops counts from."""
    return [(len(p.prompt), len(p.chosen), len(p.rejected)) for p in group]


def run_mlx_dpo(spec: dict) -> dict:
    import mlx_dpo  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx

    from mlx_dpo.config import config_from_dict
    from mlx_dpo.engines.mlx_engine import MLXEngine

    opts = spec.get("mlx_dpo", {})
    cfg = config_from_dict(_mlx_dpo_config(spec, opts), source="bench")
    engine = MLXEngine(cfg)
    if opts.get("plain"):
        engine.fast.enabled = False  # the full-logits path, as before the hot-path work
    groups, batches, precompute_s = mlx_dpo_batches(engine, cfg, spec["batch"])
    mx.reset_peak_memory()
    times, tokens, pair_tokens = [], [], []
    for step in range(spec["warmup"] + spec["steps"]):
        batch = batches[step % len(batches)]
        seconds = timed_step(engine, batch, spec["lr"])
        if step >= spec["warmup"]:
            times.append(seconds)
            tokens.append(batch.num_tokens)
            pair_tokens.append(token_counts(groups[step % len(groups)]))
    return {"step_s": times, "tokens": tokens, "pair_tokens": pair_tokens, "pairs": spec["batch"],
            "peak_mlx_gb": mx.get_peak_memory() / 2**30,
            "precompute_s": precompute_s, "precompute_pairs": sum(map(len, groups)) if precompute_s else 0,
            "notes": engine.notes[-1]}


# -- mlx-lm-lora -----------------------------------------------------------------------------
def _linux_shim(mx) -> None:
    """mlx-lm-lora calls mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]),
    a Metal-only key: on the CPU backend supply it (wired limits are a no-op there). Bench-only."""
    real = mx.device_info

    def device_info():
        info = dict(real())
        info.setdefault("max_recommended_working_set_size", int(info.get("memory_size", 0)))
        return info

    mx.device_info = device_info


def run_mlx_lm_lora(spec: dict) -> dict:
    import mlx_dpo  # noqa: F401  (the same OpenBLAS binding as mlx-dpo, for a fair comparison)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.datasets import DPODataset
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    _linux_shim(mx)
    model, tokenizer = load(spec["model"])
    ref_model, _ = load(spec["model"])  # what its CLI does: a second full copy as reference
    ref_model.freeze()
    if spec["finetune"] == "lora":
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": spec["lora_rank"], "scale": spec["lora_scale"],
                                                         "dropout": 0.0})
    Path(spec["cache_dir"]).mkdir(parents=True, exist_ok=True)
    dataset = DPODataset(read_pairs(spec["data"]), tokenizer)
    times, tokens = [], []

    class Timer:
        def on_train_loss_report(self, info):
            if info["iteration"] > spec["warmup"]:
                times.append(1.0 / info["iterations_per_second"])
                tokens.append(info["tokens_per_second"] / info["iterations_per_second"])

        def on_val_loss_report(self, info):
            pass

    args = DPOTrainingArgs(batch_size=spec["batch"], iters=spec["warmup"] + spec["steps"], steps_per_report=1,
                           steps_per_eval=10**9, steps_per_save=10**9,
                           max_seq_length=spec["max_prompt"] + spec["max_completion"] + 64,
                           grad_checkpoint=spec.get("mlx_lm_lora", {}).get("grad_checkpoint", False),
                           adapter_file=str(Path(spec["cache_dir"]) / "mlx_lm_lora_adapters.safetensors"))
    mx.reset_peak_memory()
    train_dpo(model, ref_model, optim.AdamW(learning_rate=spec["lr"]), dataset, None, args,
              training_callback=Timer())
    return {"step_s": times, "tokens": tokens, "pairs": spec["batch"], "peak_mlx_gb": mx.get_peak_memory() / 2**30}


# -- TRL -------------------------------------------------------------------------------------
def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > spec["warmup"]:
                times.append(time.perf_counter() - self.start)

    extra = spec.get("trl", {})
    config = DPOConfig(output_dir=str(Path(spec["cache_dir"]) / "trl"), use_cpu=True, bf16=False,
                       per_device_train_batch_size=spec["batch"], learning_rate=spec["lr"],
                       max_steps=spec["warmup"] + spec["steps"], max_length=spec["max_prompt"] + spec["max_completion"] + 64,
                       logging_steps=10**6, save_strategy="no", report_to=[], **extra)
    rows = read_pairs(spec["data"])
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                          for r in rows]),
                         callbacks=[Timer()])
    trainer.train()
    return {"step_s": times, "tokens": [None] * len(times), "pairs": spec["batch"],
            "threads": torch.get_num_threads()}


RUNNERS = {"mlx-dpo": run_mlx_dpo, "mlx-lm-lora": run_mlx_lm_lora, "trl": run_trl}


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in RUNNERS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(RUNNERS)}}} SPEC_JSON")
    spec = json.loads(sys.argv[2])
    result = RUNNERS[sys.argv[1]](spec)
    result["peak_rss_gb"] = peak_rss_gb()
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
