"""Stage 7's gates from a retention figure or an evaluation report (JSON).

The report is a JSON object; every key is optional except that retention must be derivable:

    {"benchmarks": {"mmlu": {"baseline": 0.452, "final": 0.447},     # any benchmark names
                    "humaneval": {"baseline": 0.18, "final": 0.18}},
     "capability_retention": 98.9,   # percent; default: mean over benchmarks of 100 * final / baseline
     "win_rate": 57.0,               # percent of comparisons won against the baseline, > win_rate_target
     "kl_divergence": 0.08,          # final KL, <= kl_target
     "preference_gap": 0.21,         # preference gap maintained, >= preference_gap_target
     "decontamination": 0.97}        # share of clean evaluation items, >= decontamination target

Retention is the mean of the per-benchmark ratios (each is listed too), so one benchmark
cannot dominate by its scale; retention and win rate are percentages, as in the workflow.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .config import ConstraintsConfig
from .gates import Check, GateInputError, judge

KEYS = ("benchmarks", "capability_retention", "win_rate", "kl_divergence", "preference_gap",
        "decontamination")
# What each figure can be: an impossible one is a broken report (exit 2), not a failed gate.
RANGES = {"capability_retention": (0.0, math.inf, "a percentage >= 0 (above 100 when a model gains)"),
          "win_rate": (0.0, 100.0, "a percentage in [0, 100]"),
          "kl_divergence": (0.0, math.inf, "a KL divergence >= 0"),
          "preference_gap": (0.0, 1.0, "a gap in [0, 1]"),
          "decontamination": (0.0, 1.0, "a share in [0, 1]")}


def evaluation_checks(c: ConstraintsConfig, retention: Optional[float] = None,
                      report_path=None) -> list[Check]:
    if retention is not None and report_path is not None:
        raise GateInputError("stage evaluation takes --retention or --report, not both")
    if report_path is None:
        return [_retention_check(float(retention), c, "given by hand")]
    report = read_report(Path(report_path))
    checks = []
    retention, detail = report.get("capability_retention"), "from the report"
    if report.get("benchmarks"):
        per = {name: 100.0 * b["final"] / b["baseline"] for name, b in report["benchmarks"].items()}
        checks += [Check(f"retention/{name}", value, None, ">=", True,
                         f"{report['benchmarks'][name]['final']:g} / baseline "
                         f"{report['benchmarks'][name]['baseline']:g}") for name, value in per.items()]
        if retention is None:
            retention, detail = sum(per.values()) / len(per), f"mean over {len(per)} benchmark(s)"
    checks.insert(0, _retention_check(retention, c, detail))
    optional = [("win_rate", getattr(c, "win_rate_target", 50.0), ">"),
                ("kl_divergence", c.kl_target, "<="),
                ("preference_gap", c.preference_gap_target, ">="),
                ("decontamination", _decontamination_target(c), ">=")]
    for key, threshold, comparison in optional:
        if key in report:
            checks.append(judge(key, report[key], threshold, comparison, "from the report"))
    return checks


def _retention_check(value: float, c: ConstraintsConfig, detail: str) -> Check:
    if 0 < value <= 1.5:  # a fraction where a percentage belongs
        detail += f"; retention is in percent: did you mean {100 * value:.1f}?"
    return judge("capability_retention", value, c.capability_retention_target, ">=", detail)


def _decontamination_target(c: ConstraintsConfig) -> float:
    from .data.quality import DEFAULT_DECONTAMINATION

    return getattr(c, "decontamination_target", None) or DEFAULT_DECONTAMINATION


def read_report(path: Path) -> dict:
    """The report, validated: unknown keys, non-numbers and bad baselines name file and key."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateInputError(f"evaluation report not found: {path}") from None
    except (OSError, ValueError) as err:
        raise GateInputError(f"{path}: not a readable JSON file: {err}") from None
    if not isinstance(report, dict):
        raise GateInputError(f"{path}: expected a JSON object with keys {', '.join(KEYS)}")
    unknown = sorted(set(report) - set(KEYS))
    if unknown:
        raise GateInputError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS)}")
    for key, (low, high, allowed) in RANGES.items():
        if key in report and not low <= _number(path, key, report[key]) <= high:
            raise GateInputError(f"{path}: {key} must be {allowed}, got {report[key]!r}")
    _check_benchmarks(path, report.get("benchmarks"))
    if "capability_retention" not in report and not report.get("benchmarks"):
        raise GateInputError(f"{path}: needs capability_retention (percent) or benchmarks "
                             "({name: {baseline, final}}) to compute it")
    return report


def _check_benchmarks(path: Path, benchmarks) -> None:
    if benchmarks is None:
        return
    if not isinstance(benchmarks, dict):
        raise GateInputError(f"{path}: benchmarks must be an object {{name: {{baseline, final}}}}")
    for name, entry in benchmarks.items():
        where = f"benchmarks.{name}"
        if not isinstance(entry, dict) or set(entry) != {"baseline", "final"}:
            raise GateInputError(f"{path}: {where} must be an object with exactly baseline and final")
        if _number(path, f"{where}.baseline", entry["baseline"]) <= 0:
            raise GateInputError(f"{path}: {where}.baseline must be > 0 (retention divides by it)")
        if _number(path, f"{where}.final", entry["final"]) < 0:
            raise GateInputError(f"{path}: {where}.final must be >= 0")


def _number(path: Path, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GateInputError(f"{path}: {key} must be a finite number, got {value!r}")
    return float(value)
