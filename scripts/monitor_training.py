"""The workflow's monitor_training.py, written against mlx-dpo's API.

    .venv/bin/python scripts/monitor_training.py dpo_config.yaml outputs/dpo-exp-001/checkpoint-1000

Reads the checkpoint's training_metrics.json (validation KL), recomputes the validation
preference gap with the checkpoint's policy, and prints both against the config's targets.
Exit code 0 when the gates pass, 1 when one fails, 2 for a missing checkpoint or bad config.
The same as `mlx-dpo monitor CHECKPOINT --config CONFIG`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mlx_dpo.errors import UserError
from mlx_dpo.training_metrics import check_quality_gates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the training config (YAML)")
    parser.add_argument("checkpoint_dir", type=Path, help="a checkpoint folder, e.g. outputs/run/checkpoint-1000")
    args = parser.parse_args(argv)
    try:
        with open(args.config) as f:
            config = yaml.safe_load(f)  # a plain dict, as in the workflow template
        results = check_quality_gates(args.checkpoint_dir, config)
    except (OSError, yaml.YAMLError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"KL Divergence: {results['kl_divergence']:.4f} (target ≤{results['kl_target']:g})")
    print(f"Preference Gap: {results['preference_gap']:.4f} (target ≥{results['preference_gap_target']:g})")
    print(f"Gates Passed: {'✅' if results['gates_passed'] else '❌'}")
    return 0 if results["gates_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
