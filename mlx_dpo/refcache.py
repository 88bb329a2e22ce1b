"""Reference log-probs computed once before training and cached on disk.

The reference never changes during DPO, so its forward pass in every step is pure waste:
the summed completion log-prob of each chosen and rejected sequence is computed once (in
eval batches, longest first), stored as safetensors, and attached to the encoded pairs;
collate() then puts them in `Batch.ref_logps` and the engine skips the reference forward.

The cache key is a hash of everything the numbers depend on: the token ids of every pair
(so the data, the tokenizer, the chat template and the length limits), the reference weights
as loaded (values, dtypes, shapes; LoRA leaves excluded: the reference is adapters-off), the
model config, and the MLX version. A later run on the same data and model reuses the file.

Evaluation, whose KL and preference gap the gates judge (kl_guard.py during training, `mlx-dpo
gates` from the checkpoints' metrics), needs more of the reference than these sums: the KL is exact
over the whole vocabulary at every completion position. What it takes from the reference is its
final hidden state at those positions and its head's weight (head_logps.head_eval), so
`attach_eval_hidden` keeps those hidden states for the validation pairs: made by one reference pass
at the first evaluation (the one that evaluation would have run anyway), saved under the same kind
of key, and every later evaluation, and a later run on the same data and model, runs no reference
forward. They cost (completion tokens x hidden size) floats, so `training.eval_reference_cache_gb`
bounds them.

Exactness: the cached sums are computed by the same function as the live path
(`FastPath.reference_sums`); they differ from a live value only by float rounding of a
different padded batch shape (tests/test_perf_refcache.py bounds it).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .data.batching import collate
from .data.tokenize import EncodedPair
from .hardware import cache_root

CACHE_VERSION = 1
ADAPTER_LEAVES = ("lora_a", "lora_b")


def default_cache_dir() -> Path:
    return cache_root() / "reference-logps"


def data_digest(pairs: list[EncodedPair]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in pairs:
        for ids in (p.prompt, p.chosen, p.rejected):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def weights_digest(module) -> str:
    """Hash of an MLX module's parameter values (LoRA adapter leaves left out)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    h = hashlib.blake2b(digest_size=16)
    for name, value in sorted(tree_flatten(module.parameters()), key=lambda kv: kv[0]):
        if name.rsplit(".", 1)[-1] in ADAPTER_LEAVES:
            continue
        h.update(f"{name}:{value.dtype}:{value.shape};".encode())
        # bfloat16 has no numpy dtype: hash the bytes of a lossless float32 view.
        arr = value.astype(mx.float32) if value.dtype == mx.bfloat16 else value
        h.update(np.array(arr).tobytes())
    return h.hexdigest()


def cache_key(engine, pairs: list[EncodedPair]) -> str:
    import mlx.core as mx

    models = engine.models
    reference = models.reference if models.reference is not None else models.policy
    parts = {"version": CACHE_VERSION, "mlx": mx.__version__, "data": data_digest(pairs),
             "weights": weights_digest(reference),
             "config": json.dumps(models.model_config, sort_keys=True, default=str)}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()


def precompute_reference(cfg, engine, data, batch_size: int, echo: Callable[[str], None] = print) -> None:
    """training.precompute_reference: attach cached reference sums to the training pairs."""
    if not cfg.training.precompute_reference:
        return
    if not hasattr(engine, "reference_sums"):
        echo("training.precompute_reference: this engine computes the reference live")
        return
    values = load_or_compute(engine, data.pairs, batch_size, cfg.training.reference_cache_dir, echo)
    attach(data.pairs, values)


def load_or_compute(engine, pairs: list[EncodedPair], batch_size: int, cache_dir: Optional[Path] = None,
                    echo: Callable[[str], None] = print) -> np.ndarray:
    """Reference log-prob sums, (N, 2) [chosen, rejected], from the cache or computed and saved."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(engine, pairs)
    path = folder / f"{key}.safetensors"
    cached = _read(path, len(pairs))
    if cached is not None:
        echo(f"reference log-probs: {len(pairs)} pairs from cache {path}")
        return cached
    values = compute(engine, pairs, batch_size)
    _write(path, values, key)
    echo(f"reference log-probs: computed for {len(pairs)} pairs, cached in {path}")
    return values


def compute(engine, pairs: list[EncodedPair], batch_size: int) -> np.ndarray:
    """(N, 2) reference sums, computed in batches of similar length (less padding)."""
    import mlx.core as mx

    out = np.zeros((len(pairs), 2), dtype=np.float32)
    order = np.argsort([-p.length for p in pairs], kind="stable")
    pad_id = engine.tokenizer.eos_token_id or 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([_without_cache(pairs[i]) for i in idx], pad_id)
        sums = np.array(engine.reference_sums(batch).astype(mx.float32))
        b = len(idx)
        out[idx, 0], out[idx, 1] = sums[:b], sums[b:]
    mx.clear_cache()  # a one-off pass: its buffers' sizes do not come back in training
    return out


def attach(pairs: list[EncodedPair], values: np.ndarray) -> None:
    for pair, (chosen, rejected) in zip(pairs, values):
        pair.ref_logps = (float(chosen), float(rejected))


def _without_cache(pair: EncodedPair) -> EncodedPair:
    if pair.ref_logps is None and pair.ref_hidden is None:
        return pair
    return EncodedPair(pair.prompt, pair.chosen, pair.rejected, pair.truncated, pair.line)


def _read(path: Path, n: int) -> Optional[np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        return None
    try:
        values = load_file(str(path))["reference_logps"]
    except Exception:  # a damaged file is recomputed, never trusted
        return None
    return values if values.shape == (n, 2) and np.isfinite(values).all() else None


def _write(path: Path, values: np.ndarray, key: str) -> None:
    _save({"reference_logps": np.ascontiguousarray(values, dtype=np.float32)}, path, key)


def _save(tensors: dict, path: Path, key: str) -> None:
    """Write to a temp name, then rename: a killed run never leaves a half-written cache."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"key": key, "version": str(CACHE_VERSION)})
    os.replace(tmp, path)


def attach_eval_hidden(engine, pairs: list[EncodedPair], batches: list, pad_id: int, limit_gb: float,
                       cache_dir: Optional[Path] = None, echo: Callable[[str], None] = print) -> bool:
    """Attach the reference's hidden states at the completion positions (`EncodedPair.ref_hidden`)
    to the pairs of `batches` (index arrays into `pairs`: one rank's evaluation batches, as
    Trainer._evaluate forms them, so the values are those a live evaluation computes), from the
    cache file or computed and saved. False, with nothing attached, when the engine has no use for
    them (the PyTorch engine, the full-logits path), limit_gb is 0, or they would pass limit_gb."""
    if limit_gb <= 0 or not hasattr(engine, "reference_hidden") or not batches:
        return False
    used = [pairs[i] for b in batches for i in b]
    lengths = np.array([n for p in used for n in (len(p.chosen), len(p.rejected))], dtype=np.int64)

    def fits(width: int) -> bool:
        gb = int(lengths.sum()) * width * 4 / 2**30
        if gb > limit_gb:
            echo(f"evaluation: the reference's hidden states would take {gb:.1f} GB, over "
                 f"training.eval_reference_cache_gb ({limit_gb:g}); each evaluation runs the reference")
        return gb <= limit_gb

    width = int(engine.models.model_config.get("hidden_size") or 0)  # else known after a first batch
    if width and not fits(width):
        return False
    parts = {"pairs": cache_key(engine, used), "batches": [len(b) for b in batches], "kind": "eval-hidden"}
    key = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{key}.eval-hidden.safetensors"
    rows = _read_hidden(path, lengths)
    if rows is not None:
        echo(f"evaluation: the reference's hidden states for {len(used)} pairs from cache {path}")
    else:
        rows = _compute_hidden(engine, pairs, batches, pad_id, None if width else fits)
        if rows is None:
            return False
        _write_hidden(path, rows, key)
        echo(f"evaluation: the reference's hidden states for {len(used)} pairs computed, cached in {path}")
    for j, pair in enumerate(used):
        pair.ref_hidden = (rows[2 * j], rows[2 * j + 1])
    return True


def _compute_hidden(engine, pairs: list[EncodedPair], batches: list, pad_id: int,
                    fits: Optional[Callable[[int], bool]]) -> Optional[list[np.ndarray]]:
    """Per pair, in `batches`' order: chosen rows' hidden states, then rejected's; None when the
    engine has no use for them, or `fits` (given when the hidden size was unknown) refuses the
    size the first batch shows."""
    out = []
    for indices in batches:
        rows = engine.reference_hidden(collate([_without_cache(pairs[i]) for i in indices], pad_id))
        if rows is None or (fits is not None and not out and not fits(rows[0].shape[1])):
            return None
        b = len(indices)
        for j in range(b):
            out += [rows[j], rows[b + j]]
    return out


def _read_hidden(path: Path, lengths: np.ndarray) -> Optional[list[np.ndarray]]:
    from safetensors.numpy import load_file

    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        hidden, saved = tensors["hidden"], tensors["lengths"]
    except Exception:  # a damaged file is recomputed, never trusted
        return None
    if not np.array_equal(saved, lengths) or hidden.shape[0] != lengths.sum() or not np.isfinite(hidden).all():
        return None
    return np.split(hidden, np.cumsum(lengths)[:-1])


def _write_hidden(path: Path, rows: list[np.ndarray], key: str) -> None:
    _save({"hidden": np.ascontiguousarray(np.concatenate(rows), dtype=np.float32),
           "lengths": np.array([len(r) for r in rows], dtype=np.int64)}, path, key)
