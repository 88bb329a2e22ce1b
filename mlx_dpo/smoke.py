"""`mlx-dpo train CONFIG --smoke`: try a config for a minute before trusting it with a day.

On a random sample of the user's own pairs it runs a few optimizer steps, an evaluation, a
checkpoint save and a resume from it (the resumed run must reach the uninterrupted run's
evaluation loss), then one step on the longest pairs of the train file. From the measured
step, evaluation and save times and the peak memory it projects the full run's wall time and
peak memory on this machine. Any failure exits non-zero (SmokeFailed: 1, bad input: 2).
"""
from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .autotune import resolve_batch_size
from .checkpoint import list_checkpoints
from .config import Config, check_files
from .data.batching import collate
from .data.pipeline import make_encoder
from .data.records import read_pairs
from .data.tokenize import EncodedData
from .engines import make_engine, select_device
from .errors import TrainingStopped, UserError
from .trainer import Trainer

SMOKE_STEPS = 4  # the first is a warm-up (compilation, allocation) and is not timed


class SmokeFailed(TrainingStopped):
    """Something the full run would also hit failed (exit code 1)."""


class _Timed:
    """The engine, with the time of each optimizer step, evaluation and save recorded."""

    def __init__(self, engine):
        self._engine = engine
        self.step_seconds: list[float] = []
        self.eval_seconds = self.eval_pairs = 0.0
        self.save_seconds: list[float] = []
        self._pending = 0.0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward_backward(self, batch, global_pairs):
        start = time.perf_counter()
        out = self._engine.forward_backward(batch, global_pairs)
        self._pending += time.perf_counter() - start
        return out

    def apply_update(self, learning_rate, skip=False):
        start = time.perf_counter()
        out = self._engine.apply_update(learning_rate, skip)
        self.step_seconds.append(self._pending + time.perf_counter() - start)
        self._pending = 0.0
        return out

    def evaluate(self, batch):
        start = time.perf_counter()
        out = self._engine.evaluate(batch)
        self.eval_seconds += time.perf_counter() - start
        self.eval_pairs += batch.num_pairs
        return out

    def save_state(self, folder):
        start = time.perf_counter()
        self._engine.save_state(folder)
        self.save_seconds.append(time.perf_counter() - start)


def run_smoke(cfg: Config, echo: Callable[[str], None] = print, steps: int = SMOKE_STEPS) -> dict:
    """Run the smoke check; returns its report (also printed). Raises SmokeFailed on failure."""
    check_files(cfg)
    if cfg.compute.num_devices > 1:
        echo(f"smoke: compute.num_devices is {cfg.compute.num_devices}; checking one device "
             "(the projection assumes the others keep pace)")
    scfg = copy.deepcopy(cfg)
    scfg.compute.num_devices = 1
    out = Path(tempfile.mkdtemp(prefix="mlx-dpo-smoke-"))
    stage = "loading the model"
    try:
        start = time.perf_counter()
        device = select_device(scfg)
        engine = _Timed(make_engine(scfg, device))
        load_seconds = time.perf_counter() - start
        stage = "choosing the batch size"
        batch_size, source = resolve_batch_size(scfg, device, engine, echo=echo)
        echo(f"smoke: {device.kind} ({device.name}), batch size {batch_size} ({source})")
        stage = "reading the data"
        sample = _sample(scfg, engine.tokenizer, batch_size, steps)
        stage = "training, evaluating, saving and resuming"
        resume = _train_and_resume(scfg, engine, sample, batch_size, steps, out, echo)
        stage = "a step on the longest pairs"
        peak = _longest_batch_peak(engine, sample["longest"])
    except (UserError, KeyboardInterrupt):
        shutil.rmtree(out, ignore_errors=True)
        raise
    except Exception as err:  # anything else is what the smoke run is for: report, exit 1
        raise SmokeFailed(f"smoke run failed while {stage}: {type(err).__name__}: {err} "
                          f"(files kept in {out})") from err
    shutil.rmtree(out, ignore_errors=True)
    report = _project(cfg, engine, sample, batch_size, load_seconds, peak, device.memory_gb)
    report["resume_loss_diff"] = resume
    for line in report_lines(report):
        echo(line)
    return report


def _sample(cfg: Config, tokenizer, batch_size: int, steps: int) -> dict:
    """Random train pairs for the steps, a few validation pairs, and the longest train pairs."""
    encoder = make_encoder(cfg, tokenizer)
    rng = np.random.default_rng(cfg.training.seed)
    train = read_pairs(cfg.data.train_file, cfg.data.on_bad_record).pairs  # every record is validated
    need = batch_size * cfg.training.gradient_accumulation_steps * steps
    picked = [train[i] for i in rng.permutation(len(train))[:need]]
    val_all = read_pairs(cfg.data.validation_file, cfg.data.on_bad_record).pairs if cfg.data.validation_file else []
    val_count = min(len(val_all), cfg.data.max_eval_pairs or len(val_all))
    val = [val_all[i] for i in rng.permutation(len(val_all))[:batch_size]] if val_all else picked[:batch_size]
    by_chars = sorted(train, key=_chars, reverse=True)[:4 * batch_size]  # candidates, then exact tokens
    longest = sorted((encoder.encode(p) for p in by_chars), key=lambda e: e.length, reverse=True)[:batch_size]
    encode = lambda pairs: EncodedData([encoder.encode(p) for p in pairs], 0)  # noqa: E731
    return {"train": encode(picked), "val": encode(val), "longest": longest, "val_count": val_count}


def _chars(pair) -> int:
    return len(str(pair.prompt)) + max(len(str(pair.chosen)), len(str(pair.rejected)))


def _train_and_resume(cfg: Config, engine, sample: dict, batch_size: int, steps: int, out: Path,
                      echo) -> float:
    """Train `steps` (save halfway and at the end), then resume from the halfway checkpoint and
    train to the end again: both must end at the same evaluation loss. Returns the difference."""
    scfg = copy.deepcopy(cfg)
    t = scfg.training
    t.max_steps, t.eval_steps, t.save_steps, t.logging_steps = steps, steps, steps // 2, 1
    scfg.logging.output_dir, scfg.logging.wandb_project = str(out), None
    scfg.logging.save_total_limit = 3

    def trainer():
        return Trainer(scfg, engine, sample["train"], sample["val"], batch_size, echo=echo, progress=False)

    echo(f"smoke: {steps} steps on {len(sample['train'].pairs)} sampled pairs, saving at steps {steps // 2} "
         f"and {steps}")
    first = trainer().train()
    saved = list_checkpoints(out)
    if [p.name for p in saved] != [f"checkpoint-{steps // 2}", f"checkpoint-{steps}"]:
        raise RuntimeError(f"expected checkpoints at steps {steps // 2} and {steps}, found {[p.name for p in saved]}")
    shutil.rmtree(saved[-1])  # as if the run had died after the halfway save
    second = trainer()
    if second.resume() is None or second.state.step != steps // 2:
        raise RuntimeError(f"resume did not restore checkpoint-{steps // 2}")
    echo(f"smoke: resumed from checkpoint-{steps // 2}, training to step {steps} again")
    again = second.train()
    a, b = first["eval/loss"], again["eval/loss"]
    if not abs(a - b) <= 1e-3 * max(1.0, abs(a)):
        raise RuntimeError(f"the resumed run ends at eval/loss {b:.6f}, the uninterrupted one at {a:.6f}")
    return abs(a - b)


def _longest_batch_peak(engine, longest: list) -> float:
    """One training micro-batch and one evaluation on the longest pairs: the run's worst case."""
    batch = collate(longest, engine.tokenizer.eos_token_id or 0)
    engine._engine.forward_backward(batch, batch.num_pairs)
    engine._engine.apply_update(0.0, skip=True)  # gradients dropped, weights unchanged
    engine._engine.evaluate(batch)
    return engine.peak_memory_gb()


def _project(cfg: Config, engine: _Timed, sample: dict, batch_size: int, load_seconds: float,
             peak: float, memory_gb: float) -> dict:
    t = cfg.training
    timed = engine.step_seconds[1:] or engine.step_seconds  # the first step includes warm-up
    step = statistics.median(timed)
    evals = (1 + t.max_steps // t.eval_steps + (t.max_steps % t.eval_steps > 0)) if cfg.data.validation_file else 0
    saves = t.max_steps // t.save_steps + (t.max_steps % t.save_steps > 0)
    eval_per_pair = engine.eval_seconds / max(engine.eval_pairs, 1)
    save = statistics.median(engine.save_seconds)
    total = load_seconds + step * t.max_steps + eval_per_pair * sample["val_count"] * evals + save * saves
    return {"batch_size": batch_size, "steps_measured": len(engine.step_seconds),
            "first_step_seconds": engine.step_seconds[0], "seconds_per_step": step,
            "eval_seconds_per_pair": eval_per_pair, "save_seconds": save, "load_seconds": load_seconds,
            "full_steps": t.max_steps, "full_evals": evals, "full_eval_pairs": sample["val_count"],
            "full_saves": saves, "projected_seconds": total, "peak_memory_gb": peak,
            "device_memory_gb": memory_gb,
            "longest_tokens": max(p.length for p in sample["longest"])}


def report_lines(r: dict) -> list[str]:
    return [
        "smoke: passed (steps, evaluation, checkpoint save, resume)",
        f"  step time        {r['seconds_per_step']:.3f} s median over {r['steps_measured'] - 1} steps of "
        f"{r['batch_size']} pairs (first step {r['first_step_seconds']:.2f} s: warm-up)",
        f"  evaluation       {r['eval_seconds_per_pair'] * 1000:.1f} ms per pair",
        f"  checkpoint save  {r['save_seconds']:.2f} s",
        f"  resume           reached the uninterrupted run's eval/loss (difference {r['resume_loss_diff']:.2g})",
        f"projected wall time of the full run: {_duration(r['projected_seconds'])} "
        f"({r['full_steps']} steps, {r['full_evals']} evaluations of {r['full_eval_pairs']} pairs, "
        f"{r['full_saves']} checkpoint saves, model load {r['load_seconds']:.0f} s)",
        f"projected peak memory: {_size(r['peak_memory_gb'])} of {r['device_memory_gb']:.1f} GB "
        f"(measured on the longest pairs of the train file, {r['longest_tokens']} tokens)",
    ]


def _size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1024:.0f} MB"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"
