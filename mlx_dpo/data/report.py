"""Human-readable rendering of a QualityReport (`mlx-dpo data validate` without --json)."""
from __future__ import annotations

from .quality import QualityReport

MARK = {True: "PASS", False: "FAIL"}


def render(report: QualityReport, show: int = 10) -> str:
    """The report as text; lists (bad records, contaminated pairs, ...) show `show` items each."""
    out = [f"Preference data: {report.path}", ""]
    out += _gates(report)
    out += _listing("Malformed records", [f"line {e.line}: {e.reason}" for e in report.bad_records], show)
    out += _listing("Contaminated pairs", [_contaminated(c) for c in report.contaminated], show)
    out += _listing("Conflicting preferences", [
        f"{c.kind} among {c.responses} responses of the prompt at line {c.prompt_line}: "
        f"lines {', '.join(map(str, c.lines))}" for c in report.conflicts], show)
    out += _listing("Exact duplicates", [f"line {ln} repeats line {first}" for ln, first in report.duplicates],
                    show)
    if report.gap is not None:
        out += _listing("Unusable scores", [f"line {ln}: {r}" for ln, r in report.gap.problems], show)
        if report.gap.inverted:
            out += ["", f"Note: {report.gap.inverted} pair(s) have scores that prefer the rejected response."]
    out += _lengths(report.lengths)
    if report.notes:
        out += ["", "Notes:"] + [f"  - {n}" for n in report.notes]
    verdict = "all gates pass" if report.passed else \
        "failed: " + ", ".join(n for n, g in report.gates.items() if not g.passed)
    out += ["", f"Result: {MARK[report.passed]} ({verdict})"]
    return "\n".join(out)


def _gates(report: QualityReport) -> list[str]:
    lines = ["Gates:"]
    for name, gate in report.gates.items():
        value = "unavailable" if gate.value is None else _fmt(gate.value)
        target = "reported only" if gate.threshold is None else f"target {gate.comparison} {_fmt(gate.threshold)}"
        lines.append(f"  [{MARK[gate.passed]}] {name:<18} {value:<12} ({target})")
        if gate.detail:
            lines.append(f"         {gate.detail}")
    return lines


def _listing(title: str, items: list[str], show: int) -> list[str]:
    if not items:
        return []
    lines = ["", f"{title} ({len(items)}):"] + [f"  {item}" for item in items[:show]]
    if len(items) > show:
        lines.append(f"  ... {len(items) - show} more (all of them with --json, or --show N)")
    return lines


def _contaminated(entry: dict) -> str:
    by_benchmark: dict[str, list[str]] = {}
    for item in entry["items"]:
        by_benchmark.setdefault(item["benchmark"], []).append(item["item"])
    touched = "; ".join(f"{name}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                        for name, items in by_benchmark.items())
    return f"line {entry['line']} ({'/'.join(entry['fields'])}) -> {touched}"


def _lengths(lengths: dict) -> list[str]:
    if not lengths or lengths.get("prompt") is None:
        return []
    unit = lengths["unit"]
    lines = ["", f"Lengths in {unit}" + (f" ({lengths['tokenizer']})" if lengths.get("tokenizer") else "")
             + ":  median / p95 / max"]
    for key in ("prompt", "chosen", "rejected"):
        s = lengths[key]
        lines.append(f"  {key:<9} {s['median']:>8} {s['p95']:>8} {s['max']:>8}")
    if "truncated_share" in lengths:
        lim = lengths["limits"]
        lines.append(f"  would be truncated at max_prompt_length={lim['max_prompt_length']}, "
                     f"max_response_length={lim['max_response_length']}: "
                     f"{lengths['truncated_share']:.1%} of pairs (prompt {lengths['prompt_truncated_share']:.1%}, "
                     f"response {lengths['response_truncated_share']:.1%})")
    else:
        lines.append("  (give --tokenizer or --config for token lengths and the share training would truncate)")
    return lines


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
