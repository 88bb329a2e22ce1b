"""The API the DPO workflow's scripts import (`from training_metrics import validate_dpo_pairs`).

    from mlx_dpo.training_metrics import validate_dpo_pairs
    metrics = validate_dpo_pairs(dpo_path=Path("data/val.jsonl"), gap_threshold=0.15)
    metrics.avg_gap, metrics.total_pairs, metrics.decontamination, metrics.gates["pairs"].passed

A measure that is unavailable (no scores, no benchmark) is NaN, so a comparison such as
`metrics.avg_gap >= 0.15` is False: the gate fails instead of raising.
"""
from .data.quality import Gate, QualityReport, validate_dpo_pairs
from .gates import enforce_gates  # stages 2, 5 and 7 (issue #4)
from .monitor import check_quality_gates  # the workflow's monitor_training.py (issue #4)

DPOPairMetrics = QualityReport  # the name the workflow's prose uses for the result

__all__ = ["validate_dpo_pairs", "QualityReport", "DPOPairMetrics", "Gate", "enforce_gates",
           "check_quality_gates"]
