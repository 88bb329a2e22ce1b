"""`training.batch_size: auto`: the per-chip table, else a short probe, cached.

For a chip the table (hardware.BATCH_TABLE) does not know, e.g. a CUDA GPU or a new Apple
chip, the probe runs real forward/backward passes at the config's longest sequences
(max_prompt_length + max_response_length) with growing batch sizes and keeps the largest
whose peak memory stays within `compute.memory_fraction` of the device's memory. Peak memory
grows linearly in the batch size, so a size whose predicted peak is over budget is never run:
the probe does not push the machine into swapping or an out-of-memory crash. The answer is
cached per chip, model, sequence length and memory-relevant settings.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import Config
from .data.batching import collate
from .data.tokenize import EncodedPair
from .errors import UserError
from .hardware import BATCH_TABLE, DeviceInfo, cache_root

MAX_PROBE_BATCH = 256


def table_lookup(device: DeviceInfo) -> Optional[int]:
    """The table's batch size for this chip, or None when the chip is not in the table."""
    if device.kind == "cpu":
        return BATCH_TABLE["cpu"]
    if device.kind != "metal":
        return None  # the table holds Apple chips only: CUDA GPUs are probed
    for chip, size in BATCH_TABLE.items():
        if device.name == chip or device.name.startswith(chip + " "):
            return size
    return None


def resolve_batch_size(cfg: Config, device: DeviceInfo, engine, rank: int = 0, world: int = 1,
                       echo: Callable[[str], None] = print) -> tuple[int, str]:
    """(pairs per micro-batch, where that number came from)."""
    if cfg.training.batch_size != "auto":
        return int(cfg.training.batch_size), "config"
    size, source = table_lookup(device), f"the batch table ({device.name})"
    if size is None:
        key = cache_key(cfg, device)
        entry = read_cache().get(key)
        if entry:
            size, source = int(entry["batch_size"]), f"a probe cached in {cache_path()}"
        else:
            budget = cfg.compute.memory_fraction * device.memory_gb
            size, peak = probe_batch_size(engine, cfg.data.max_prompt_length, cfg.data.max_response_length,
                                          budget, echo)
            write_cache(key, {"batch_size": size, "peak_memory_gb": round(peak, 3),
                              "budget_gb": round(budget, 3), "when": time.strftime("%Y-%m-%d")})
            source = f"a probe ({peak:.2f} GB peak of a {budget:.1f} GB budget; cached)"
    if world > 1:  # every rank must use the same size: the smallest fits everywhere
        mine = np.zeros(world)
        mine[rank] = size
        size = int(engine.all_reduce_sum(mine).min())
    return size, source


# -- the probe -------------------------------------------------------------------------------
def probe_batch_size(engine, prompt_len: int, response_len: int, budget_gb: float,
                     echo: Callable[[str], None] = print, max_batch: int = MAX_PROBE_BATCH) -> tuple[int, float]:
    """The largest batch (pairs) whose training step peaks within budget_gb: (size, its peak)."""
    measured: dict[int, float] = {}
    # One unmeasured pass first: one-time allocations (kernels, caches) are not per-pair memory.
    _trial(engine, 1, prompt_len, response_len)
    size = 1
    while size <= max_batch and _predict(measured, size) <= budget_gb:
        peak = _trial(engine, size, prompt_len, response_len)
        echo(f"batch probe: {size} pairs x {prompt_len + response_len} tokens -> "
             + ("out of memory" if peak is None else f"{peak:.2f} GB peak"))
        if peak is None or peak > budget_gb:
            break
        measured[size] = peak
        size *= 2
    if not measured:
        raise UserError(f"one pair of {prompt_len + response_len} tokens does not fit the memory budget "
                        f"({budget_gb:.1f} GB): lower data.max_prompt_length/max_response_length, use "
                        "model.finetune: lora or compute.gradient_checkpointing, or raise compute.memory_fraction")
    best = max(measured)
    # Between best and 2*best, the linear fit of the measured peaks says what else fits.
    guess = min(_largest_fitting(measured, budget_gb), 2 * best - 1, max_batch)
    if guess > best:
        peak = _trial(engine, guess, prompt_len, response_len)
        if peak is not None and peak <= budget_gb:
            measured[guess] = peak
            best = guess
    return best, measured[best]


def _fit(measured: dict[int, float]) -> tuple[float, float]:
    """(fixed GB, GB per pair) through the two largest measurements."""
    sizes = sorted(measured)
    if len(sizes) == 1:  # one point: assume it is all per-pair memory (an upper bound)
        return 0.0, measured[sizes[0]] / sizes[0]
    a, b = sizes[-2], sizes[-1]
    slope = max((measured[b] - measured[a]) / (b - a), 1e-9)
    return measured[b] - slope * b, slope


def _predict(measured: dict[int, float], size: int) -> float:
    if not measured:
        return 0.0
    fixed, per_pair = _fit(measured)
    return fixed + per_pair * size


def _largest_fitting(measured: dict[int, float], budget_gb: float) -> int:
    fixed, per_pair = _fit(measured)
    return int(math.floor((budget_gb - fixed) / per_pair))


def _trial(engine, size: int, prompt_len: int, response_len: int) -> Optional[float]:
    """Peak GB of one training micro-batch of `size` maximal pairs (no weights change)."""
    token = engine.tokenizer.eos_token_id or 0
    pair = EncodedPair([token] * prompt_len, [token] * response_len, [token] * response_len)
    batch = collate([pair] * size, token)
    _reset_peak(engine)
    try:
        engine.forward_backward(batch, size)
        return engine.peak_memory_gb()
    except (RuntimeError, MemoryError) as err:
        if "memory" not in str(err).lower() and "alloc" not in str(err).lower():
            raise
        return None
    finally:
        engine.apply_update(0.0, skip=True)  # drops the gradients, leaves the weights alone
        _release(engine)


def _reset_peak(engine) -> None:
    reset = getattr(engine, "reset_peak_memory", None)
    if reset is not None:
        reset()
    elif "mlx.core" in sys.modules:
        import mlx.core as mx

        mx.reset_peak_memory()


def _release(engine) -> None:
    """Hand cached buffers back, so one trial's allocations do not count in the next."""
    gc.collect()
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        mx.clear_cache()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- the cache -------------------------------------------------------------------------------
def cache_path() -> Path:
    return cache_root() / "batch_sizes.json"


def cache_key(cfg: Config, device: DeviceInfo) -> str:
    """Chip, model, sequence length, and the settings that change memory per pair."""
    m, c = cfg.model, cfg.compute
    tuning = f"lora-r{m.lora_rank}" if m.finetune == "lora" else "full"
    return "|".join([device.kind, device.name, cfg.policy_path,
                     f"len={cfg.data.max_prompt_length}+{cfg.data.max_response_length}", tuning,
                     f"gc={int(c.gradient_checkpointing)}", f"fp16={int(c.fp16)}",
                     f"mem={c.memory_fraction}"])


def read_cache() -> dict:
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(key: str, entry: dict) -> None:
    """Atomic replace: two runs probing at once cannot leave a half-written file."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = read_cache()
        data[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-probe next time
