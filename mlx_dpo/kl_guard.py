"""`constraints.kl_target` enforced during training, after every evaluation.

When validation KL(policy || reference) exceeds the target (or is NaN), `constraints.kl_action`
decides:
  warn      print a warning and go on;
  stop      end the run (TrainingStopped, exit 1), pointing at the best checkpoint;
  rollback  restore the best checkpoint within the target (weights and optimizer state) and go
            on from the current step with the next batches, so the policy does not replay the
            data that pushed it out; after `constraints.max_rollbacks` rollbacks the run stops.
With rollback the starting point is saved as checkpoint-0, so a target within the limit always
exists. The best checkpoint (best_checkpoint.py) is kept up to date on every save whatever
the action, recorded in OUTPUT_DIR/best.json and protected from rotation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from . import checkpoint
from .best_checkpoint import BestTracker, read_best, within_kl
from .errors import TrainingStopped


class KLGuard:
    def __init__(self, trainer, echo: Callable[[str], None] = print):
        c = trainer.cfg.constraints
        self.action, self.kl_target, self.max_rollbacks = c.kl_action, c.kl_target, c.max_rollbacks
        self.gap_target = c.preference_gap_target
        self.echo = echo if trainer.is_main else (lambda _line: None)
        self.tracker = BestTracker(trainer.out, c, fresh=trainer.state.step == 0, enabled=trainer.is_main)
        trainer.protected |= self.tracker.protected
        self.rollbacks = 0
        self.violations = 0
        self._candidate_step = None  # step whose weights were just evaluated within the target

    @classmethod
    def attach(cls, trainer, echo: Callable[[str], None] = print) -> "KLGuard":
        guard = cls(trainer, echo)
        if trainer.val_data is None:  # KL is measured at evaluations, on the validation pairs
            guard.echo(f"constraints.kl_target is not enforced: no data.validation_file, so validation KL is "
                       f"never measured and kl_action {guard.action!r} never fires")
        trainer.after_evaluate.append(guard.after_evaluate)
        trainer.after_save.append(guard.after_save)
        return guard

    # -- hooks ----------------------------------------------------------------------------
    def after_evaluate(self, trainer, metrics: dict) -> None:
        step = trainer.state.step
        if within_kl(metrics, self.kl_target):
            self._candidate_step = step
            if step == 0 and self.action == "rollback" and not checkpoint.list_checkpoints(trainer.out):
                trainer.save()  # checkpoint-0: the rollback target of last resort
            return
        self._candidate_step = None
        self.violations += 1
        kl = metrics.get("eval/kl", math.nan)
        what = f"step {step}: validation KL {kl:.4g} exceeds constraints.kl_target {self.kl_target}"
        if self.action == "warn":
            self.echo(f"warning: {what} (kl_action: warn, training goes on)")
        elif self.action == "stop":
            raise TrainingStopped(f"{what}: stopped (constraints.kl_action: stop). {self._best_line(trainer)}")
        else:
            self._rollback(trainer, what)

    def after_save(self, trainer, folder: Path) -> None:
        step = trainer.state.step
        if self._candidate_step != step:  # saved weights were not evaluated at this step
            return
        if self.tracker.consider(folder, step, trainer.state.last_eval):
            trainer.protected = set(self.tracker.protected)
            b = self.tracker.best
            self.echo(f"best checkpoint: {folder.name} ({b['metric']} {b['value']:.4g}, KL {b['kl']:.4g})")

    # -- actions --------------------------------------------------------------------------
    def _rollback(self, trainer, what: str) -> None:
        # Only the main rank tracks the record in memory, and on a second machine the other
        # ranks have no best.json at all: the main rank's record decides for every rank, so
        # they roll back (or stop) together.
        best = read_best(trainer.out)
        if not _main_rank_says(trainer, best is not None):
            raise TrainingStopped(f"{what}: no checkpoint within the target to roll back to; stopped.")
        if self.rollbacks >= self.max_rollbacks:
            raise TrainingStopped(f"{what} after {self.rollbacks} rollback(s) (constraints.max_rollbacks): "
                                  f"stopped. {self._best_line(trainer)}")
        trainer.restore(trainer.out / best["checkpoint"] if best else None)
        self.rollbacks += 1
        if best is None:  # a rank without the record: it has just taken rank 0's state
            return
        # The restored weights carry their own evaluation: the next checkpoint must say so.
        trainer.state.last_eval = dict(best["metrics"])
        self.echo(f"rollback {self.rollbacks}/{self.max_rollbacks}: {what}; restored {best['checkpoint']} "
                  f"(KL {best['kl']:.4g}) and continuing from step {trainer.state.step}")

    def _best_line(self, trainer) -> str:
        best = read_best(trainer.out)
        if best is None:
            return "No checkpoint within the target was saved." if trainer.is_main else "Rank 0 keeps the checkpoints."
        return f"Best checkpoint within the target: {trainer.out / best['checkpoint']} (see best.json)."

    def summary(self, final_eval: dict) -> dict:
        """The run summary's gate fields: the final gap against its target, best checkpoint, KL events."""
        gap = final_eval.get("eval/preference_gap")
        best = self.tracker.best
        return {"eval/preference_gap": gap, "preference_gap_target": self.gap_target,
                "gap_within_target": None if gap is None or math.isnan(gap) else gap >= self.gap_target,
                "best_checkpoint": best["path"] if best else None, "kl_violations": self.violations,
                "rollbacks": self.rollbacks}

    @staticmethod
    def summary_lines(s: dict) -> list[str]:
        lines = []
        if s["gap_within_target"] is not None:
            verdict = "within" if s["gap_within_target"] else "BELOW"
            lines.append(f"validation preference gap: {s['eval/preference_gap']:.4f} "
                         f"({verdict} preference_gap_target {s['preference_gap_target']})")
        if s["kl_violations"]:
            lines.append(f"KL over kl_target at {s['kl_violations']} evaluation(s); rollbacks: {s['rollbacks']}")
        if s["best_checkpoint"]:
            lines.append(f"best checkpoint within kl_target: {s['best_checkpoint']} (best.json)")
        return lines


def _main_rank_says(trainer, yes: bool) -> bool:
    """The main rank's answer on every rank (a sum where the others add 0; alone, `yes`)."""
    flag = np.array([1.0 if yes and trainer.is_main else 0.0])
    return bool(trainer.engine.all_reduce_sum(flag)[0] > 0.5)
