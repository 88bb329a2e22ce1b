"""`mlx-dpo monitor`: stage-5 gates of a checkpoint, or of each new checkpoint of a running training."""
from __future__ import annotations

import json
import math
import sys

import click


@click.command()
@click.argument("checkpoint_dir", required=False, type=click.Path(file_okay=False))
@click.option("--config", type=click.Path(dir_okay=False),
              help="The training config (default: the config recorded in the checkpoint).")
@click.option("--watch", "watch_dir", type=click.Path(file_okay=False), metavar="OUTPUT_DIR",
              help="Follow a running training: a line for each new checkpoint in OUTPUT_DIR, until the run "
                   "writes its final model (or --timeout). OUTPUT_DIR may not exist yet: it is waited for.")
@click.option("--interval", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              help="--watch: seconds between looks at OUTPUT_DIR.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="--watch: stop after this many seconds without a new checkpoint (exit 2 if OUTPUT_DIR "
                   "never appeared).")
@click.option("--no-recompute", is_flag=True,
              help="Use the preference gap recorded at the checkpoint's evaluation instead of recomputing it "
                   "(no model is loaded).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (single checkpoint).")
def monitor(checkpoint_dir, config, watch_dir, interval, timeout, no_recompute, as_json):
    """Check a checkpoint against the DPO training gates (KL, preference gap).

    \b
      mlx-dpo monitor outputs/run/checkpoint-200 --config dpo_config.yaml
      mlx-dpo monitor --watch outputs/run --config dpo_config.yaml

    Reads the checkpoint's training_metrics.json for the validation KL and recomputes the
    validation preference gap with the checkpoint's policy. Exit code 0 when the gates pass,
    1 when one fails, 2 for a missing checkpoint or config, or a --watch OUTPUT_DIR that
    never appeared before --timeout.
    """
    from ..errors import UserError
    from ..monitor import check_quality_gates, result_line, watch

    if (checkpoint_dir is None) == (watch_dir is None):
        raise UserError("give a CHECKPOINT_DIR or --watch OUTPUT_DIR (one of them)")
    # click's FloatRange lets NaN and infinity through: they would sleep forever or crash time.sleep.
    for option, seconds in (("--interval", interval), ("--timeout", timeout)):
        if seconds is not None and not math.isfinite(seconds):
            raise UserError(f"{option} must be a finite number of seconds, got {seconds}")
    if watch_dir is not None:
        try:
            result = watch(watch_dir, config, not no_recompute, interval, timeout, echo=click.echo)
        except KeyboardInterrupt:
            click.echo("stopped watching")
            sys.exit(0)
        sys.exit(0 if result is None or result["gates_passed"] else 1)
    result = check_quality_gates(checkpoint_dir, config, recompute=not no_recompute)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"KL divergence:  {result['kl_divergence']:.4f} (target <= {result['kl_target']:g})"
                   if result["kl_divergence"] is not None else "KL divergence:  not recorded")
        gap = result["preference_gap"]
        click.echo(f"Preference gap: {gap:.4f} (target >= {result['preference_gap_target']:g})"
                   if gap is not None else "Preference gap: not available")
        click.echo(f"Gates passed:   {'yes' if result['gates_passed'] else 'no'}")
        click.echo(result_line(result))
    sys.exit(0 if result["gates_passed"] else 1)
