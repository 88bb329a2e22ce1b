"""Quality gates of the workflow's stages: thresholds, verdicts and the enforce API.

  preference_data  (stage 2)  the pair file: #3's `validate_dpo_pairs` gates (pairs, gap,
                              decontamination, conflicts, malformed records)
  dpo_training     (stage 5)  a checkpoint's validation KL <= kl_target and preference gap
                              >= preference_gap_target, or a KL given by hand (not both)
  evaluation       (stage 7)  capability retention >= capability_retention_target (percent),
                              given by hand or from an evaluation report (eval_report.py)

Thresholds come from a config's `constraints` section (a Config, a YAML path or a dict), else
from the checkpoint's recorded config, else from the defaults (the workflow's numbers).
A missing input, an unknown stage, a hand-given value that is impossible (NaN, infinite or
negative) or one the checkpoint also supplies is a `GateInputError` (exit 2), never a failed gate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .config import Config, ConstraintsConfig, config_from_dict, load_config
from .data.quality import Gate
from .errors import UserError

STAGES = ("preference_data", "dpo_training", "evaluation")
RULE = "=" * 60


class GateInputError(UserError):
    """Unknown stage, missing or unreadable input (exit code 2)."""


@dataclass
class Check(Gate):
    """A gate verdict (#3's Gate) that may also be skipped, with strict comparisons allowed."""
    skipped: bool = False

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")


def judge(name: str, value: Optional[float], threshold: float, comparison: str, detail: str = "") -> Check:
    """A numeric gate; a missing or NaN value fails (it could not be measured)."""
    measured = value is not None and not (isinstance(value, float) and math.isnan(value))
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           "<": lambda a, b: a < b}
    passed = measured and ops[comparison](value, threshold)
    return Check(name, value if measured else None, threshold, comparison, bool(passed),
                 detail or ("" if measured else "not measured"))


def as_check(gate) -> Check:
    if isinstance(gate, Check):
        return gate
    return Check(gate.name, gate.value, gate.threshold, gate.comparison, gate.passed, gate.detail)


# -- thresholds ---------------------------------------------------------------------------
def resolve_config(config) -> Optional[Config]:
    """A Config from a Config, a YAML path or a dict (the workflow passes yaml.safe_load output)."""
    if config is None or isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config, source="<config dict>")
    return load_config(config)


def constraints_of(config, checkpoint_dir: Optional[Path] = None) -> ConstraintsConfig:
    cfg = resolve_config(config)
    if cfg is not None:
        return cfg.constraints
    recorded = recorded_config(checkpoint_dir) if checkpoint_dir else None
    return recorded.constraints if recorded else ConstraintsConfig()


def recorded_config(checkpoint_dir: Path) -> Optional[Config]:
    """The resolved config a checkpoint was trained with (its state.json), if readable."""
    try:
        raw = json.loads((Path(checkpoint_dir) / "state.json").read_text())["config"]
        return config_from_dict(raw, source=f"{checkpoint_dir}/state.json")
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None


def read_training_metrics(checkpoint_dir: Path) -> dict:
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise GateInputError(f"checkpoint folder not found: {folder}")
    path = folder / "training_metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise GateInputError(f"{folder}: no training_metrics.json (not an mlx-dpo checkpoint)") from None
    except ValueError as err:
        raise GateInputError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(metrics, dict):
        raise GateInputError(f"{path}: expected a JSON object of metrics")
    return metrics


# -- stages -------------------------------------------------------------------------------
def stage_checks(stage: str, dpo_pairs_path=None, kl_divergence=None, capability_retention=None, *,
                 checkpoint_dir=None, report_path=None, config=None, scores=None,
                 benchmarks=None) -> list[Check]:
    """Every gate of `stage` with its verdict."""
    if stage == "preference_data":
        _need(stage, "dpo_pairs_path (--pairs)", dpo_pairs_path)
        return _preference_data(dpo_pairs_path, config, scores, benchmarks)
    if stage == "dpo_training":
        _need(stage, "a checkpoint (--checkpoint) or kl_divergence (--kl)", checkpoint_dir, kl_divergence)
        if checkpoint_dir is not None and kl_divergence is not None:
            raise GateInputError("stage dpo_training takes --checkpoint or --kl, not both: the checkpoint "
                                 "supplies its measured KL; give one of them")
        kl = _hand_given("kl_divergence (--kl)", kl_divergence, "kl_divergence")
        return dpo_training_checks(config, checkpoint_dir, kl)
    if stage == "evaluation":
        _need(stage, "capability_retention (--retention) or an evaluation report (--report)",
              capability_retention, report_path)
        from .eval_report import evaluation_checks

        retention = _hand_given("capability_retention (--retention)", capability_retention, "capability_retention")
        return evaluation_checks(constraints_of(config), retention, report_path)
    raise GateInputError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def _need(stage: str, what: str, *values) -> None:
    if all(v is None for v in values):
        raise GateInputError(f"stage {stage} needs {what}")


def _hand_given(what: str, value, key: str) -> Optional[float]:
    """A number given by hand, held to the range an evaluation report's `key` has
    (eval_report.RANGES): NaN, infinite or out of range is bad input (exit 2), not a failed gate."""
    from .eval_report import RANGES

    if value is None:
        return None
    low, high, allowed = RANGES[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and low <= number <= high):
        raise GateInputError(f"{what} must be {allowed}, got {value!r}")
    return number


def _preference_data(path, config, scores, benchmarks) -> list[Check]:
    from .data.quality import validate_dpo_pairs

    if not Path(path).is_file():
        raise GateInputError(f"preference pairs file not found: {path}")
    cfg = resolve_config(config)
    gap = cfg.constraints.preference_gap_target if cfg else None
    report = validate_dpo_pairs(path, gap, scores=scores, benchmarks=benchmarks, config=cfg)
    return [as_check(g) for g in report.gates.values()]


def dpo_training_checks(config, checkpoint_dir=None, kl_divergence=None) -> list[Check]:
    c = constraints_of(config, checkpoint_dir)
    if checkpoint_dir is None:
        return [judge("kl_divergence", float(kl_divergence), c.kl_target, "<=", "given by hand")]
    metrics = read_training_metrics(checkpoint_dir)
    step = metrics.get("step")
    kl = metrics.get("kl_divergence", metrics.get("eval/kl"))
    gap = metrics.get("eval/preference_gap")
    return [judge("kl_divergence", _num(kl), c.kl_target, "<=", f"validation KL at step {step}"),
            judge("preference_gap", _num(gap), c.preference_gap_target, ">=",
                  f"eval/preference_gap at step {step}" if gap is not None else
                  "not recorded in training_metrics.json (a run without a validation file?)")]


def _num(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# -- the workflow's API -------------------------------------------------------------------
def format_checks(title: str, checks: list[Check]) -> list[str]:
    """The printed table: every metric with its target and PASS / FAIL / SKIP."""
    width = max([len(c.name) for c in checks] + [10])
    lines = ["", RULE, f"Quality gates: {title}", RULE]
    for c in checks:
        value = "-" if c.value is None else (f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value))
        target = (f"{c.comparison} {c.threshold:g}" if c.threshold is not None else
                  "(reported)" if c.comparison else "-")
        line = f"{c.name:<{width}}  {value:>10}  target {target:<12}  {c.status}"
        lines.append(line + (f"  {c.detail}" if c.detail else ""))
    failed = [c.name for c in checks if not c.passed and not c.skipped]
    lines += [RULE, "Result: PASSED" if not failed else f"Result: FAILED ({', '.join(failed)})", RULE]
    return lines


def all_passed(checks: list[Check]) -> bool:
    return all(c.passed or c.skipped for c in checks)


def enforce_gates(stage: str, dpo_pairs_path: Optional[Path] = None, kl_divergence: Optional[float] = None,
                  capability_retention: Optional[float] = None, *, checkpoint_dir=None, report_path=None,
                  config=None, scores=None, benchmarks=None,
                  echo: Callable[[str], None] = print) -> bool:
    """Check the gates of `stage`, print each metric with its target and verdict, and return
    True when all pass. Raises GateInputError (a UserError, exit 2) for an unknown stage or a
    missing, conflicting or impossible input; the workflow template printed and returned False
    there instead."""
    checks = stage_checks(stage, dpo_pairs_path, kl_divergence, capability_retention,
                          checkpoint_dir=checkpoint_dir, report_path=report_path, config=config,
                          scores=scores, benchmarks=benchmarks)
    for line in format_checks(stage, checks):
        echo(line)
    return all_passed(checks)
