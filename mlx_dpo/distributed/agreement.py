"""What every rank must agree on before training: the run's settings and its inputs.

Paths may differ between machines (home folders), so data files and local model folders are
compared by content instead: a digest of each data file, and of each model folder's file
names, sizes and config.json. Logging settings are rank 0's business and are left out.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .. import __version__
from ..config import Config

PATH_KEYS = {"model.base_model", "model.reference_model", "model.policy_model",
             "data.train_file", "data.validation_file"}
IGNORED_SECTIONS = ("logging",)


def run_description(cfg: Config) -> dict[str, str]:
    """Flat {key: value} of everything that must match across ranks."""
    flat = {"mlx-dpo": __version__}
    for section, values in cfg.to_dict().items():
        if section in IGNORED_SECTIONS:
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            flat[name] = _content(value) if name in PATH_KEYS and value else repr(value)
    return flat


def differences(mine: dict, theirs: dict, limit: int = 5) -> list[str]:
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    lines = [f"{k}: {_short(mine.get(k))} here, {_short(theirs.get(k))} there" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"... and {len(keys) - limit} more")
    return lines


def _content(path: str) -> str:
    p = Path(path)
    if p.is_file():
        return "file sha256:" + _file_digest(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}\n".encode())
        if (p / "config.json").is_file():
            h.update((p / "config.json").read_bytes())
        return "folder sha256:" + h.hexdigest()
    return "name:" + path  # a Hugging Face repo id: the same id means the same model


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(value) -> str:
    text = "missing" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
