"""Checkpoints: atomic save, rotation, discovery of the newest complete one.

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed to
checkpoint-N: a crash mid-save leaves at most a stray temporary folder, never a damaged
checkpoint (mx.save_safetensors truncates its target first, so writing in place is unsafe).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

NAME = re.compile(r"^checkpoint-(\d+)$")
ANY_NAME = re.compile(r"^(checkpoint-\d+|\.(tmp|old)-checkpoint-\d+-\d+)$")  # complete, or a save cut short
STATE_FILE = "state.json"
METRICS_FILE = "training_metrics.json"


def save_checkpoint(output_dir: Path, step: int, write_weights: Callable[[Path], None],
                    state: dict, metrics: dict, keep: int, protect: tuple[str, ...] = ()) -> Path:
    """Write checkpoint-`step` atomically, then delete the oldest beyond `keep`.

    `write_weights(folder)` writes the engine's files; state.json is written last, so its
    presence marks a complete checkpoint. Folders named in `protect` are never rotated out.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_weights(tmp)
    _write_json(tmp / METRICS_FILE, metrics)
    _write_json(tmp / STATE_FILE, state)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # a re-run reaching the same step: move the old one aside first
        old = output_dir / f".old-checkpoint-{step}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(output_dir)
    rotate(output_dir, keep, protect)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def is_checkpoint_name(name: str) -> bool:
    return ANY_NAME.match(name) is not None


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rotate(output_dir: Path, keep: int, protect: tuple[str, ...] = ()) -> None:
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - keep)]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)
    for stray in output_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stray, ignore_errors=True)  # left behind by a crash mid-save


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=float))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
