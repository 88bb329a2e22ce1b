"""`mlx-dpo doctor`: this machine's compute facts, and whether CONFIG can run here."""
from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value, e.g. --set compute.device=cuda (repeatable).")
@click.option("--probe", is_flag=True,
              help="With training.batch_size auto on a chip not in the batch table: load the model and "
                   "run the batch-size probe now (its answer is cached for training).")
@click.option("--no-measure", is_flag=True, help="Skip the BLAS matmul measurement (a few seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(config, overrides, probe, no_measure, as_json):
    """Print the OS, chip, memory, MLX version and default device, the BLAS in use with its
    measured GFLOP/s, CUDA availability and the environment variables that matter.

    With CONFIG, also check that it can run on this machine: input files (every record read
    as training reads it), device and engine, model files, a memory estimate, devices for data parallelism, and the batch size it would
    use. Exit code 0 when it can, 1 when a check failed, 2 for a bad config.
    """
    from ..config import load_config
    from ..doctor import as_json as to_json
    from ..doctor import exit_code, format_findings, system_findings

    if overrides and not config:
        raise click.UsageError("--set changes a CONFIG: give the config file too")
    cfg = load_config(config, overrides) if config else None  # ConfigError: exit 2
    findings = system_findings(measure=not no_measure)
    if cfg is not None:
        from ..doctor_config import config_findings

        findings += config_findings(cfg, probe=probe)
    if as_json:
        click.echo(json.dumps(to_json(findings), indent=2))
    else:
        for line in format_findings(findings):
            click.echo(line)
        if cfg is not None and not exit_code(findings):
            click.echo(f"next: mlx-dpo train {config} --smoke  (time and memory of the full run, measured)")
    sys.exit(exit_code(findings))
