"""The workflow's enforce_quality_gates.py, written against mlx-dpo's API.

    .venv/bin/python scripts/enforce_quality_gates.py --pairs data/preference_pairs.jsonl \
        --checkpoint outputs/dpo-exp-001/checkpoint-1000 --retention 96.5

Runs the gate of every stage whose input is given, in workflow order (preference_data,
dpo_training, evaluation), and stops at the first stage that fails. Exit code 0 when all
pass, 1 when a gate fails, 2 for a missing or bad input. The same as `mlx-dpo gates STAGE`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_dpo.errors import UserError
from mlx_dpo.training_metrics import enforce_gates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, help="stage 2: the preference-pair JSONL file")
    parser.add_argument("--benchmark", action="append", help="stage 2: benchmark for decontamination")
    parser.add_argument("--kl", type=float, help="stage 5: a KL divergence")
    parser.add_argument("--checkpoint", type=Path, help="stage 5: a checkpoint folder (instead of --kl)")
    parser.add_argument("--retention", type=float, help="stage 7: capability retention, percent")
    parser.add_argument("--report", type=Path, help="stage 7: an evaluation report, JSON (instead of --retention)")
    parser.add_argument("--config", type=Path, help="take the targets from this config")
    args = parser.parse_args(argv)
    stages = [("preference_data", dict(dpo_pairs_path=args.pairs, benchmarks=args.benchmark), args.pairs),
              ("dpo_training", dict(kl_divergence=args.kl, checkpoint_dir=args.checkpoint),
               args.kl if args.checkpoint is None else args.checkpoint),
              ("evaluation", dict(capability_retention=args.retention, report_path=args.report),
               args.retention if args.report is None else args.report)]
    chosen = [(stage, inputs) for stage, inputs, given in stages if given is not None]
    if not chosen:
        parser.error("give the input of at least one stage: --pairs, --kl/--checkpoint, --retention/--report")
    try:
        for stage, inputs in chosen:
            if not enforce_gates(stage, config=args.config, **inputs):
                return 1
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
