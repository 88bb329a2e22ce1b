"""The config half of `mlx-dpo doctor`: can this config run on this machine, and with what?

Nothing here loads a model: weights are sized from the safetensors headers, so the checks
take a second even for a 70B checkpoint. `probe=True` is the exception: it loads the engine
to run the batch-size probe (and caches its answer for `training`).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Optional

from .autotune import cache_key, read_cache, resolve_batch_size, table_lookup
from .config import HUB_ID, Config
from .doctor import Finding
from .engines import engine_kind, select_device
from .engines.torch_support import INSTALL_HINT, torch_missing
from .errors import UserError
from .hardware import DeviceInfo

FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def config_findings(cfg: Config, probe: bool = False) -> list[Finding]:
    out = _file_findings(cfg)
    device, engine = _device_findings(cfg, out)
    sizes = {}
    for role, path in {"policy": cfg.policy_path, "reference": cfg.reference_path}.items():
        if role == "reference" and path == cfg.policy_path:
            continue
        sizes[role] = _model_finding(cfg, role, path, engine, out)
    if device is None:
        return out
    if sizes.get("policy"):
        out.append(_memory_finding(cfg, device, engine, sizes))
    out += _parallel_findings(cfg, device, engine)
    out.append(_batch_finding(cfg, device, engine, probe and not any(f.status == "fail" for f in out)))
    return out


def _file_findings(cfg: Config) -> list[Finding]:
    out = []
    for key in ("train_file", "validation_file"):
        path = getattr(cfg.data, key)
        if path is None:
            out.append(Finding("config", key, "not set (no eval/ metrics or KL during training)", "warn"))
        elif Path(path).is_file():
            out.append(_records_finding(cfg, key, path))
        else:
            out.append(Finding("config", key, f"{path}: file not found", "fail"))
    return out


def _records_finding(cfg: Config, key: str, path: str) -> Finding:
    """The file read as training will read it (data.on_bad_record), so that a malformed record
    fails here, with its line, rather than at the start of the run."""
    from .data.records import RecordError, read_pairs

    size = f"{Path(path).stat().st_size / 2**20:.1f} MB"
    try:
        result = read_pairs(path, cfg.data.on_bad_record)
    except RecordError as err:
        return Finding("config", key, f"{err} ({size})", "fail")
    skipped = f", {len(result.bad)} malformed skipped (first: {result.bad[0]})" if result.bad else ""
    return Finding("config", key, f"{path} ({size}, {len(result.pairs)} pairs{skipped})",
                   "warn" if result.bad else "ok")


def _device_findings(cfg: Config, out: list) -> tuple[Optional[DeviceInfo], Optional[str]]:
    try:
        device = select_device(cfg)
        engine = engine_kind(cfg, device)
    except UserError as err:
        out.append(Finding("config", "device", str(err), "fail"))
        return None, None
    out.append(Finding("config", "device", f"{device.kind}: {device.name}, {device.memory_gb:.1f} GB", "ok"))
    missing = torch_missing() if engine == "torch" else []
    out.append(Finding("config", "engine", f"{engine}" + (f": needs {', '.join(missing)}: {INSTALL_HINT}"
                                                          if missing else ""), "fail" if missing else "ok"))
    return device, engine


def _model_finding(cfg: Config, role: str, path: str, engine: Optional[str], out: list) -> Optional[dict]:
    folder = Path(path)
    if not folder.is_dir():
        folder = _hub_snapshot(path)
        if folder is None:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            bad = offline or not HUB_ID.fullmatch(path)
            why = ("not a local folder, and not in the Hugging Face cache while HF_HUB_OFFLINE=1" if offline
                   else "not found" if bad else "a Hugging Face id, not downloaded yet (it will be on the first run)")
            out.append(Finding("config", f"{role} model", f"{path}: {why}", "fail" if bad else "warn"))
            return None
    config = folder / "config.json"
    if not config.is_file():
        out.append(Finding("config", f"{role} model", f"{path}: no config.json", "fail"))
        return None
    quantized = "quantization" in json.loads(config.read_text())
    sizes = weight_sizes(folder)
    if engine == "torch" and quantized:
        out.append(Finding("config", f"{role} model", f"{path}: MLX-quantized, which the PyTorch engine "
                                                      "cannot load", "fail"))
        return None
    if sizes is None:
        status = "warn" if engine == "torch" else "fail"
        out.append(Finding("config", f"{role} model", f"{path}: no *.safetensors weights", status))
        return None
    out.append(Finding("config", f"{role} model", f"{path}: {_count(sizes['params'])} parameters"
                                                  + (" (quantized)" if quantized else ""), "ok"))
    return sizes


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _hub_snapshot(repo_id: str) -> Optional[Path]:
    """The cached snapshot folder of a Hub model, if it was downloaded before."""
    if not HUB_ID.fullmatch(repo_id) or "/" not in repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an unusual id or cache layout: treat as not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def weight_sizes(folder: Path) -> Optional[dict]:
    """Parameter count and bytes, split into float and packed (quantized) tensors, read from
    the safetensors headers alone (8-byte length, then JSON)."""
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith(("adapters", "optimizer"))]
    if not files:
        return None
    sizes = {"params": 0, "float_params": 0, "packed_bytes": 0}
    for f in files:
        with open(f, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(info["shape"])
            sizes["params"] += count
            if info["dtype"] in FLOAT_BYTES:
                sizes["float_params"] += count
            else:
                sizes["packed_bytes"] += info["data_offsets"][1] - info["data_offsets"][0]
    return sizes


def memory_estimate_gb(cfg: Config, device: DeviceInfo, engine: Optional[str], sizes: dict) -> float:
    """Weights, gradients and AdamW state, before activations (the batch probe covers those)."""
    half = cfg.compute.fp16 and device.kind in ("metal", "cuda")
    weight_bytes = 2 if half else 4

    def model_bytes(s: dict) -> float:
        return s["float_params"] * weight_bytes + s["packed_bytes"]

    policy = sizes["policy"]
    total = model_bytes(policy)
    if cfg.model.finetune == "full":
        # gradients + AdamW's two moments; the PyTorch engine keeps float32 master weights
        master = 4 if engine == "torch" else weight_bytes
        total += policy["float_params"] * (master * 3 + (master - weight_bytes))
        total += model_bytes(sizes.get("reference") or policy)  # the frozen copy
    elif sizes.get("reference"):
        total += model_bytes(sizes["reference"])
    return total / 2**30


def _memory_finding(cfg: Config, device: DeviceInfo, engine: Optional[str], sizes: dict) -> Finding:
    need = memory_estimate_gb(cfg, device, engine, sizes)
    budget = cfg.compute.memory_fraction * device.memory_gb
    shown = f"{need:.1f} GB" if need >= 1 else f"{need * 1024:.1f} MB"
    text = (f"~{shown} for weights, gradients and optimizer state (before activations) "
            f"of {device.memory_gb:.1f} GB")
    if need > device.memory_gb:
        return Finding("config", "memory", text + ": does not fit; try model.finetune: lora", "fail")
    if need > budget:
        return Finding("config", "memory", text + f": over compute.memory_fraction ({budget:.1f} GB), "
                                                  "little room for activations", "warn")
    return Finding("config", "memory", text, "ok")


def _parallel_findings(cfg: Config, device: DeviceInfo, engine: Optional[str]) -> list[Finding]:
    n = cfg.compute.num_devices
    if n == 1:
        return []
    if engine == "torch" and device.kind == "cuda":
        import torch

        have = torch.cuda.device_count()
        status = "ok" if have >= n else "fail"
        return [Finding("config", "num_devices", f"{n} (found {have} CUDA devices); launch with: "
                                                 f"torchrun --standalone --nproc_per_node {n} -m mlx_dpo "
                                                 f"train {cfg.source}", status)]
    return [Finding("config", "num_devices", f"{n}: several processes (see docs/distributed.md)")]


def _batch_finding(cfg: Config, device: DeviceInfo, engine: Optional[str], probe: bool) -> Finding:
    if cfg.training.batch_size != "auto":
        return Finding("config", "batch size", f"{cfg.training.batch_size} pairs per micro-batch (config)", "ok")
    size = table_lookup(device)
    if size is not None:
        return Finding("config", "batch size", f"{size} pairs (auto: the batch table, {device.name})", "ok")
    cached = read_cache().get(cache_key(cfg, device))
    if cached:
        return Finding("config", "batch size", f"{cached['batch_size']} pairs (auto: cached probe, "
                                               f"{cached.get('peak_memory_gb', '?')} GB peak)", "ok")
    budget = cfg.compute.memory_fraction * device.memory_gb
    if not probe:
        return Finding("config", "batch size", f"auto: {device.name} is not in the batch table; a probe at "
                                               f"the start of training finds the largest batch within "
                                               f"{budget:.1f} GB (run doctor --probe to do it now)")
    from .engines import make_engine

    size, source = resolve_batch_size(cfg, device, make_engine(cfg, device), echo=lambda line: None)
    return Finding("config", "batch size", f"{size} pairs (auto: {source})", "ok")
