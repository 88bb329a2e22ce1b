"""Monitoring a run's checkpoints against the stage-5 gates: the workflow's monitor script.

`check_quality_gates(checkpoint_dir, config)` reads the checkpoint's training_metrics.json (KL)
and recomputes the validation preference gap: it loads the checkpoint's policy, scores every
validation pair's implicit reward margin, writes them as a scores file and hands that to
issue #3's `validate_dpo_pairs(..., scores=...)`, so the number comes from the same code as the
data gap (definition: preference_gap.py). `recompute=False` uses the gap recorded at the
checkpoint's evaluation instead (no model is loaded). `watch` follows a running training.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from . import checkpoint
from .errors import UserError
from .gates import dpo_training_checks, judge, read_training_metrics, recorded_config, resolve_config


class Scorer:
    """The config's engine, loaded once and reused for every checkpoint it scores."""

    def __init__(self, cfg):
        from .data.pipeline import make_encoder
        from .data.records import read_pairs
        from .data.tokenize import encode_pairs
        from .engines import make_engine, select_device

        if not cfg.data.validation_file:
            raise UserError(f"{cfg.source}: data.validation_file is needed to recompute the preference gap")
        self.cfg = cfg
        self.engine = make_engine(cfg, select_device(cfg))
        # The validation pairs exactly as training evaluates them (same limit, same encoder).
        pairs = read_pairs(cfg.data.validation_file, cfg.data.on_bad_record).pairs
        limit = cfg.data.max_eval_pairs
        self.pairs = encode_pairs(pairs[:limit] if limit else pairs, make_encoder(cfg, self.engine.tokenizer)).pairs

    def margins(self, checkpoint_dir: Path) -> list[tuple[int, float]]:
        """(record line, implicit reward margin) per validation pair, for the checkpoint's policy.

        One pair per evaluate() call: the engine returns sums, and a sum over one pair is its
        margin exactly (no padding from other pairs either)."""
        from .data.batching import collate

        self.engine.load_state(Path(checkpoint_dir))
        pad = self.engine.tokenizer.eos_token_id or 0
        return [(p.line, self.engine.evaluate(collate([p], pad))["rewards/margins"]) for p in self.pairs]

    def preference_gap(self, checkpoint_dir: Path, target: float) -> float:
        from .data.quality import validate_dpo_pairs

        with tempfile.TemporaryDirectory() as tmp:
            scores = Path(tmp) / "validation_scores.jsonl"
            scores.write_text("".join(json.dumps({"line": line, "reward_margin": m}) + "\n"
                                      for line, m in self.margins(checkpoint_dir)))
            report = validate_dpo_pairs(self.cfg.data.validation_file, target, scores=str(scores),
                                        benchmarks=())
        return report.avg_gap


def check_quality_gates(checkpoint_dir, config=None, recompute: bool = True,
                        scorer: Optional[Scorer] = None) -> dict:
    """Stage-5 gates for one checkpoint.

    Returns {kl_divergence, preference_gap, gates_passed} as in the workflow, plus step,
    recorded_preference_gap, kl_target, preference_gap_target and checks (name -> verdict).
    `config`: a Config, a YAML path or a dict; default: the config recorded in the checkpoint.
    Raises GateInputError (exit 2) when the folder or its training_metrics.json is missing.
    """
    folder = Path(checkpoint_dir)
    metrics = read_training_metrics(folder)
    cfg = resolve_config(config) or recorded_config(folder)
    if cfg is None:
        raise UserError(f"{folder}: no config given and none recorded in state.json; pass --config")
    c = cfg.constraints
    checks = dpo_training_checks(cfg, folder)
    recorded = metrics.get("eval/preference_gap")
    gap = recorded
    if recompute:
        gap = (scorer or Scorer(cfg)).preference_gap(folder, c.preference_gap_target)
        checks[1] = judge("preference_gap", gap, c.preference_gap_target, ">=",
                          "recomputed on the validation pairs with validate_dpo_pairs")
    return {"checkpoint": str(folder), "step": metrics.get("step"),
            "kl_divergence": checks[0].value, "preference_gap": gap,
            "recorded_preference_gap": recorded, "kl_target": c.kl_target,
            "preference_gap_target": c.preference_gap_target,
            "gates_passed": all(ch.passed for ch in checks),
            "checks": {ch.name: ch.to_dict() for ch in checks}}


def result_line(r: dict) -> str:
    def part(name, value, sign, target):
        shown = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
        verdict = "PASS" if r["checks"][name]["passed"] else "FAIL"
        return f"{name} {shown} ({sign} {target:g} {verdict})"

    return (f"{Path(r['checkpoint']).name:<16} step {r['step']!s:>6}  "
            f"{part('kl_divergence', r['kl_divergence'], '<=', r['kl_target'])}  "
            f"{part('preference_gap', r['preference_gap'], '>=', r['preference_gap_target'])}  "
            f"gates {'PASS' if r['gates_passed'] else 'FAIL'}")


def run_finished(output_dir: Path) -> bool:
    """run.py exports final/ after the last checkpoint: newer than every checkpoint means done."""
    final = output_dir / "final"
    found = checkpoint.list_checkpoints(output_dir)
    return final.is_dir() and (not found or final.stat().st_mtime >= found[-1].stat().st_mtime)


def watch(output_dir, config=None, recompute: bool = True, interval: float = 10.0,
          timeout: Optional[float] = None, echo: Callable[[str], None] = print) -> Optional[dict]:
    """Print a line for each new checkpoint until the run finishes (or `timeout` seconds pass
    without a new one); returns the newest checkpoint's result.

    A missing `output_dir` may be a run that has not started yet: it is waited for, but a
    timeout before it ever appears is a UserError (exit 2; most likely a typo in the path)."""
    out, seen, last, scorer = Path(output_dir), set(), None, None
    appeared = out.is_dir()
    if not appeared:
        echo(f"waiting for {out} to appear (the run has not started yet?)")
    idle_since = time.monotonic()
    while True:
        appeared = appeared or out.is_dir()
        for folder in checkpoint.list_checkpoints(out):
            if folder.name in seen:
                continue
            seen.add(folder.name)
            idle_since = time.monotonic()
            try:
                cfg = resolve_config(config) or recorded_config(folder)
                if recompute and scorer is None and cfg is not None:
                    scorer = Scorer(cfg)
                last = check_quality_gates(folder, cfg, recompute, scorer)
                echo(result_line(last))
            except (OSError, ValueError, RuntimeError, UserError):
                if folder.exists():
                    raise
                echo(f"{folder.name:<16} rotated away before it could be read")
        if run_finished(out):
            echo(f"run finished: {out / 'final'}")
            return last
        if timeout is not None and time.monotonic() - idle_since > timeout:
            if not appeared:
                raise UserError(f"{out} never appeared in {timeout:g} s: stopped watching (a typo in the path?)")
            echo(f"no new checkpoint in {timeout:g} s: stopped watching")
            return last
        time.sleep(interval)
