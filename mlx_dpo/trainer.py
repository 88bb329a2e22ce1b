"""The training loop: data order, accumulation, logging, evaluation, checkpoints, resume.

It speaks to an Engine (engines/base.py) in numpy batches and Python floats, so the same loop
drives MLX and the CUDA fallback, on one rank or several.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import checkpoint
from .config import Config
from .data.batching import Batch, collate, epoch_order, grouping_keys, shard
from .data.tokenize import EncodedData
from .engines.base import EVAL_KEYS, SUM_KEYS, Engine
from .errors import TrainingStopped
from .preference_gap import mean_gap
from .refcache import attach_eval_hidden
from .schedule import learning_rate_at
from .tracking import MetricsLog


@dataclass
class RunState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # data position of the next micro-batch
    batch_index: int = 0
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    last_eval: dict = field(default_factory=dict)


@dataclass
class Ranks:
    """This process's place in a data-parallel group; weights split each global batch."""
    rank: int = 0
    weights: list[float] = field(default_factory=lambda: [1.0])

    @property
    def world(self) -> int:
        return len(self.weights)


class Trainer:
    def __init__(self, cfg: Config, engine: Engine, train: EncodedData, val: Optional[EncodedData],
                 batch_size: int, ranks: Ranks = Ranks(), echo: Callable[[str], None] = print,
                 progress: bool = True):
        self.cfg, self.engine, self.train_data, self.val_data = cfg, engine, train, val
        self.batch_size, self.ranks, self.echo = batch_size, ranks, echo
        self.out = Path(cfg.logging.output_dir)
        self.is_main = ranks.rank == 0
        self.log = MetricsLog(cfg, enabled=self.is_main, echo=echo)
        self.resumed_config: Optional[dict] = None  # the config of the run that resume() continued
        self.state = RunState()
        self.progress = progress and self.is_main
        self._sort_keys = grouping_keys(train.pairs, cfg.training.share_prompt)  # epoch_order's sort keys
        self._order: tuple[int, list] = (-1, [])
        self._stop_requested = False
        self._eval_cache_tried = False  # refcache.attach_eval_hidden, at the first evaluation
        # Seams for quality gates (kl_guard.py): hook(trainer, eval_metrics) after every
        # evaluation, hook(trainer, folder) after every checkpoint save; rotation keeps `protected`.
        self.after_evaluate: list[Callable] = []
        self.after_save: list[Callable] = []
        self.protected: set[str] = set()
        # Mid-run restore of a checkpoint (kl_guard's rollback): alone, each rank loads it; in a
        # group (distributed/cluster.py's MLX ring, TorchEngine.join_run under torchrun) that is
        # swapped for "rank 0 loads, the others take its state" (only rank 0 has checkpoints).
        self.restore: Callable[[Optional[Path]], None] = self._restore_from_disk

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.training
        if self.state.step == 0:
            self._evaluate()
        bar = _progress_bar(t.max_steps, self.state.step, self.progress)
        window = _Window()
        previous = _catch_sigint(self._on_interrupt)
        try:
            while self.state.step < t.max_steps and not self._stop_requested:
                stats, grad_norm, lr = self._train_step()
                self.state.step += 1
                window.add(stats)
                bar.update(1)
                step = self.state.step
                if step % t.logging_steps == 0 or step == t.max_steps:
                    self.log.log(step, window.metrics(grad_norm, lr, self.engine.peak_memory_gb()))
                    window = _Window()
                if step % t.eval_steps == 0 or step == t.max_steps:
                    self._evaluate()
                if step % t.save_steps == 0 or step == t.max_steps:
                    self.save()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            bar.close()
        if self._stop_requested:
            self.save()
            raise TrainingStopped(f"interrupted: saved {self.out / f'checkpoint-{self.state.step}'}; "
                                  "continue with --resume")
        self.log.close()
        return self.state.last_eval

    def _train_step(self) -> tuple[dict, float, float]:
        micro = [self._next_indices() for _ in range(self.cfg.training.gradient_accumulation_steps)]
        global_pairs = sum(len(m) for m in micro)
        totals = dict.fromkeys(SUM_KEYS, 0.0)
        self.engine.seed(self.cfg.training.seed * 1_000_003 + self.state.step)
        start = time.perf_counter()
        for indices in micro:
            mine = shard(indices, self.ranks.weights, self.ranks.rank)
            batch = collate([self.train_data.pairs[i] for i in mine], self._pad_id)
            for k, v in self.engine.forward_backward(batch, global_pairs).items():
                totals[k] += v
        totals = self._reduce(totals)
        lr = learning_rate_at(self.state.step, self.cfg)
        finite = math.isfinite(totals["loss"])
        grad_norm, applied = self.engine.apply_update(lr, skip=not finite)
        totals["seconds"] = time.perf_counter() - start
        self._count_bad(applied, totals["loss"], grad_norm)
        return totals, grad_norm, lr

    def _count_bad(self, applied: bool, loss: float, grad_norm: float) -> None:
        if applied:
            self.state.bad_in_a_row = 0
            return
        self.state.bad_in_a_row += 1
        self.state.skipped_steps += 1
        self.echo(f"step {self.state.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                  f"update skipped ({self.state.bad_in_a_row} in a row)")
        if self.state.bad_in_a_row >= self.cfg.training.max_bad_steps:
            last = checkpoint.latest_checkpoint(self.out)
            raise TrainingStopped(
                f"{self.state.bad_in_a_row} non-finite steps in a row (training.max_bad_steps): stopped. "
                f"Last good checkpoint: {last or 'none yet'}. Try a lower training.learning_rate "
                "or optimization.max_grad_norm.")

    # -- data position --------------------------------------------------------------------
    def _next_indices(self) -> np.ndarray:
        global_batch = self.batch_size * self.ranks.world
        while True:
            epoch, order = self._order
            if epoch != self.state.epoch:
                order = epoch_order(self._sort_keys, global_batch, self.cfg.training.seed, self.state.epoch)
                order = [b for b in order if len(b) >= self.ranks.world]
                self._order = (self.state.epoch, order)
            if self.state.batch_index < len(order):
                self.state.batch_index += 1
                return order[self.state.batch_index - 1]
            self.state.epoch, self.state.batch_index = self.state.epoch + 1, 0

    @property
    def _pad_id(self) -> int:
        return self.engine.tokenizer.eos_token_id or 0

    def _reduce(self, totals: dict) -> dict:
        keys = list(totals)
        values = self.engine.all_reduce_sum(np.array([totals[k] for k in keys], dtype=np.float64))
        return dict(zip(keys, (float(v) for v in values)))

    # -- evaluation -----------------------------------------------------------------------
    def _evaluate(self) -> dict:
        if self.val_data is None:
            return {}
        pairs = self.val_data.pairs
        order = np.argsort([-p.length for p in pairs], kind="stable")  # similar lengths together
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = batches[self.ranks.rank::self.ranks.world]
        if not self._eval_cache_tried:  # the reference's part of every later evaluation, kept
            self._eval_cache_tried = True
            t = self.cfg.training
            attach_eval_hidden(self.engine, pairs, batches, self._pad_id, t.eval_reference_cache_gb,
                               t.reference_cache_dir, self.echo if self.is_main else lambda _: None)
        totals: dict = {}
        for indices in batches:
            sums = self.engine.evaluate(collate([pairs[i] for i in indices], self._pad_id))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
        totals = self._reduce({k: totals.get(k, 0.0) for k in (*SUM_KEYS, *EVAL_KEYS)})
        metrics = _averages(totals)
        metrics["kl"] = totals["kl_sum"] / max(totals["kl_tokens"], 1.0)
        metrics["preference_gap"] = mean_gap(totals["gap_sum"], totals["pairs"])
        self.state.last_eval = {f"eval/{k}": v for k, v in metrics.items()}
        self.log.log(self.state.step, metrics, prefix="eval/")
        for hook in self.after_evaluate:  # e.g. kl_guard: warn, stop or roll back
            hook(self, self.state.last_eval)
        return metrics

    # -- checkpoints ----------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        if not self.is_main:
            return None
        state = {**asdict(self.state), "seed": self.cfg.training.seed, "config": self.cfg.to_dict()}
        metrics = {"step": self.state.step, **self.state.last_eval,
                   "kl_divergence": self.state.last_eval.get("eval/kl")}
        folder = checkpoint.save_checkpoint(self.out, self.state.step, self.engine.save_state, state,
                                            metrics, self.cfg.logging.save_total_limit, tuple(self.protected))
        for hook in self.after_save:  # e.g. the best-checkpoint tracker (main rank only)
            hook(self, folder)
        return folder

    def resume(self) -> Optional[Path]:
        folder = checkpoint.latest_checkpoint(self.out)
        if folder is None:
            return None
        saved = checkpoint.read_state(folder)
        self.resumed_config = saved.get("config")
        self.engine.load_state(folder)
        self.state = RunState(**{k: saved[k] for k in asdict(RunState()) if k in saved})
        self._truncate_metrics_after(self.state.step)
        return folder

    def _restore_from_disk(self, folder: Optional[Path]) -> None:
        if folder is None:  # rank 0 found a checkpoint that this rank cannot see
            raise TrainingStopped(f"rank {self.ranks.rank}: no checkpoint in {self.out} to restore; "
                                  "every rank needs logging.output_dir on a shared disk")
        self.engine.load_state(folder)

    def _truncate_metrics_after(self, step: int) -> None:
        """Rows logged after the checkpoint belong to the abandoned run: drop them."""
        import json

        path = self.log.path
        if self.is_main and path.exists():
            rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            path.write_text("".join(r + "\n" for r in rows))

    def _on_interrupt(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self._stop_requested = True
        self.echo("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")


def _averages(totals: dict) -> dict:
    pairs = max(totals["pairs"], 1.0)
    return {k: totals[k] / pairs for k in SUM_KEYS if k not in ("pairs", "tokens")}


class _Window:
    """Training sums since the last log line."""

    def __init__(self):
        self.totals = dict.fromkeys((*SUM_KEYS, "seconds"), 0.0)

    def add(self, stats: dict) -> None:
        for k in self.totals:
            self.totals[k] += stats.get(k, 0.0)

    def metrics(self, grad_norm: float, lr: float, peak_gb: float) -> dict:
        seconds = max(self.totals["seconds"], 1e-9)
        return {**_averages(self.totals), "grad_norm": grad_norm, "learning_rate": lr,
                "tokens_per_sec": self.totals["tokens"] / seconds,
                "pairs_per_sec": self.totals["pairs"] / seconds, "peak_memory_gb": peak_gb}


def _catch_sigint(handler):
    """Ctrl-C requests a clean stop at the next step boundary (only the main thread may
    install signal handlers; elsewhere the default behaviour stays)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                leave=False)
