"""`mlx-dpo gates STAGE`: the workflow's quality-gate enforcement as a command.

Exit codes: 0 every gate passed, 1 a gate failed, 2 unknown stage or missing/conflicting/bad input.
"""
from __future__ import annotations

import json
import sys

import click

# Which options belong to which stage: an option given to another stage is a usage error.
STAGE_OPTIONS = {"preference_data": {"pairs", "scores", "benchmarks"},
                 "dpo_training": {"checkpoint", "kl"},
                 "evaluation": {"retention", "report"}}


@click.command()
@click.argument("stage", metavar="STAGE")
@click.option("--pairs", type=click.Path(dir_okay=False), help="preference_data: the JSONL pair file.")
@click.option("--scores", type=click.Path(dir_okay=False),
              help="preference_data: a `data score` file, used for the gap instead of annotation scores.")
@click.option("--benchmark", "benchmarks", multiple=True, metavar="NAME|FILE",
              help="preference_data: benchmark for decontamination (repeatable; default: humaneval).")
@click.option("--checkpoint", type=click.Path(file_okay=False),
              help="dpo_training: a checkpoint folder (its training_metrics.json); or --kl.")
@click.option("--kl", type=float, help="dpo_training: a KL divergence given by hand (>= 0); or --checkpoint.")
@click.option("--retention", type=float, metavar="PCT",
              help="evaluation: capability retention in percent of the SFT baseline (>= 0); or --report.")
@click.option("--report", type=click.Path(dir_okay=False),
              help="evaluation: an evaluation report (JSON; see docs/quality-gates.md).")
@click.option("--config", type=click.Path(dir_okay=False),
              help="Take the targets from this config's constraints section (default: the checkpoint's "
                   "recorded config, else the workflow's defaults).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON instead of a table.")
def gates(stage, pairs, scores, benchmarks, checkpoint, kl, retention, report, config, as_json):
    """Check the quality gates of STAGE: preference_data, dpo_training or evaluation.

    \b
      mlx-dpo gates preference_data --pairs data/pairs.jsonl
      mlx-dpo gates dpo_training --checkpoint outputs/run/checkpoint-1000
      mlx-dpo gates dpo_training --kl 0.08
      mlx-dpo gates evaluation --retention 96.5
      mlx-dpo gates evaluation --report eval_report.json

    Prints every metric with its target and PASS or FAIL. Exit code 0 when all pass, 1 when
    one fails, 2 for an unknown stage or a missing, conflicting or impossible input (a
    negative, NaN or infinite --kl or --retention; --kl with --checkpoint).
    """
    from ..gates import GateInputError, all_passed, format_checks, stage_checks

    given = {name for name, value in (("pairs", pairs), ("scores", scores), ("benchmarks", benchmarks or None),
                                      ("checkpoint", checkpoint), ("kl", kl), ("retention", retention),
                                      ("report", report)) if value is not None}
    wrong = sorted(given - STAGE_OPTIONS.get(stage, given))
    if wrong:
        raise GateInputError(f"stage {stage}: option(s) {', '.join('--' + w for w in wrong)} belong to another "
                             f"stage; {stage} takes {', '.join('--' + o for o in sorted(STAGE_OPTIONS[stage]))}")
    checks = stage_checks(stage, pairs, kl, retention, checkpoint_dir=checkpoint, report_path=report,
                          config=config, scores=scores, benchmarks=list(benchmarks) or None)
    passed = all_passed(checks)
    if as_json:
        click.echo(json.dumps({"stage": stage, "passed": passed,
                               "gates": {c.name: {**c.to_dict(), "status": c.status} for c in checks}}, indent=2))
    else:
        for line in format_checks(stage, checks):
            click.echo(line)
    sys.exit(0 if passed else 1)
