"""One training run from a validated config: device, engine, data, loop, final model, summary."""
from __future__ import annotations

import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

from . import checkpoint
from .autotune import resolve_batch_size
from .config import Config, check_files
from .data.pipeline import prepare_data, read_data
from .distributed import join_cluster
from .engines import make_engine, select_device
from .errors import UserError
from .hardware import METAL_ENV_DEFAULTS, blas_name
from .init_checks import check_run_start
from .kl_guard import KLGuard
from .refcache import precompute_reference
from .trainer import Ranks, Trainer


def run_training(cfg: Config, resume: bool = False, overwrite: bool = False,
                 echo: Callable[[str], None] = print, progress: bool = True,
                 ranks: Ranks = Ranks(), engine=None) -> dict:
    """Train as the config says; returns the summary (also printed)."""
    check_files(cfg)
    raw = read_data(cfg)  # a bad record stops the run before any model loads
    cluster = join_cluster(cfg, echo)  # None alone; else the MLX ring (docs/distributed.md)
    if cluster is not None:
        ranks, echo = cluster.ranks, cluster.quiet(echo)
    out = Path(cfg.logging.output_dir)
    earlier_run = _check_output_dir(out, resume, overwrite)
    device = select_device(cfg)
    engine = engine or make_engine(cfg, device)
    if cluster is not None:
        cluster.attach(engine)
    if ranks.world == 1 and getattr(engine, "ranks", None) is not None:
        ranks = engine.ranks  # a torchrun group (PyTorch engine, docs/backends.md)
    batch_size, source = resolve_batch_size(cfg, device, engine, ranks.rank, ranks.world, echo)
    if source != "config":
        echo(f"training.batch_size auto: {batch_size} pairs, from {source}")
    for line in _runtime_lines(device, engine, batch_size):
        echo(line)
    data = prepare_data(cfg, engine.tokenizer, raw)
    for line in data.messages:
        echo(line)
    precompute_reference(cfg, engine, data.train, batch_size, echo)  # training.precompute_reference
    # --overwrite: the earlier run goes only now that this one has its model and data, and
    # torchrun's rank is known here too: only rank 0 deletes
    if earlier_run and ranks.rank == 0 and os.environ.get("RANK", "0") == "0":
        echo(f"starting again: removing the earlier run in {out} ({', '.join(p.name for p in earlier_run)})")
        for path in earlier_run:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    trainer = Trainer(cfg, engine, data.train, data.val, batch_size, ranks, echo, progress)
    if resume:
        folder = trainer.resume()
        echo(f"resumed from {folder} (step {trainer.state.step})" if folder else
             f"--resume: no checkpoint in {out}; starting from step 0")
        for line in _changed_settings(trainer.resumed_config, cfg.to_dict()):
            echo(line)
    check_run_start(cfg, engine, data, batch_size, trainer.state.step, echo)  # stage-3 gate
    guard = KLGuard.attach(trainer, echo)  # constraints.kl_target, kl_action, best.json
    joined = engine.join_run(trainer) if cluster is None and hasattr(engine, "join_run") else None
    if joined:  # a torchrun group: rank 0's state on every rank, at the start and on rollback
        echo(joined)
    start = time.perf_counter()
    with cluster.training(trainer, echo) if cluster else nullcontext():  # rank 0's state, split, watchdogs
        final_eval = trainer.train()
    if ranks.rank == 0:
        engine.export(_fresh(out / "final"))
    summary = _summary(cfg, trainer, final_eval, time.perf_counter() - start, out)
    summary.update(guard.summary(final_eval))
    for line in _summary_lines(summary) + guard.summary_lines(summary):
        echo(line)
    return summary


RUN_FILES = ("final", "metrics.jsonl", "best.json")  # with checkpoint-N and interrupted saves


def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> list[Path]:
    """What an earlier run left in `out` that --overwrite will remove (other files stay); raises
    when a run is there and neither --resume nor --overwrite says what to do with it."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in "
                        f"{out}, --overwrite deletes it; pass one")
    earlier = _earlier_run(out)
    if not earlier or (resume and checkpoint.list_checkpoints(out)):
        return []
    if resume:
        raise UserError(f"--resume: {out} has no checkpoint to continue from, only a finished or cleaned-up "
                        f"run ({', '.join(p.name for p in earlier)}): pass --overwrite to start again there, "
                        "or choose another logging.output_dir")
    if not overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(p.name for p in earlier)}): pass --resume to "
                        "continue it, --overwrite to start again, or choose another logging.output_dir")
    return earlier


def _earlier_run(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in RUN_FILES or checkpoint.is_checkpoint_name(p.name))


def _changed_settings(saved: Optional[dict], now: dict) -> list[str]:
    """One line naming each setting that differs from the resumed checkpoint's run, so that a resume
    that is not the same run (another beta, other data) says so; a warning, not an error, because
    changing max_steps to extend a run is common."""
    if not saved:
        return []
    changes = [f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
               for section, values in now.items() if section in saved
               for key, value in values.items() if key in saved[section] and saved[section][key] != value]
    if not changes:
        return []
    return [f"--resume: {len(changes)} setting(s) differ from the checkpoint's run: {'; '.join(changes)}"]


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _runtime_lines(device, engine, batch_size) -> list[str]:
    env = ", ".join(f"{k}={os.environ.get(k)}" for k in METAL_ENV_DEFAULTS)
    return [f"device: {device.kind} ({device.name}, {device.memory_gb:.0f} GB)",
            f"BLAS: {blas_name()}", f"env: {env}", *engine.notes,
            f"batch size: {batch_size} pairs per micro-batch"]


def _summary(cfg: Config, trainer: Trainer, final_eval: dict, seconds: float, out: Path) -> dict:
    kl = final_eval.get("eval/kl")
    return {"steps": trainer.state.step, "seconds": round(seconds, 1),
            "skipped_steps": trainer.state.skipped_steps,
            "eval/rewards/accuracies": final_eval.get("eval/rewards/accuracies"),
            "eval/loss": final_eval.get("eval/loss"), "eval/kl": kl,
            "kl_target": cfg.constraints.kl_target,
            "kl_within_target": None if kl is None else kl <= cfg.constraints.kl_target,
            "final_model": str(out / "final")}


def _summary_lines(s: dict) -> list[str]:
    lines = [f"done: {s['steps']} steps in {s['seconds']} s ({s['skipped_steps']} skipped)"]
    if s["eval/kl"] is not None:
        verdict = "within" if s["kl_within_target"] else "OVER"
        lines += [f"validation reward accuracy: {s['eval/rewards/accuracies']:.3f}",
                  f"validation loss: {s['eval/loss']:.4f}",
                  f"validation KL: {s['eval/kl']:.4f} ({verdict} kl_target {s['kl_target']})"]
    lines.append(f"final model: {s['final_model']}")
    return lines
