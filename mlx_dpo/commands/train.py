"""`mlx-dpo train`: run DPO from a YAML config, or the embedded smoke run with no argument."""
from __future__ import annotations

from pathlib import Path

import click

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SMOKE_CONFIG = ASSETS / "smoke.yaml"


def load_train_config(config_path, overrides):
    from ..config import load_config

    if config_path is None:  # the embedded default: its relative paths point into the package
        return load_config(SMOKE_CONFIG, overrides, base_dir=ASSETS)
    return load_config(config_path, overrides)


@click.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value, e.g. --set training.beta=0.2 (repeatable).")
@click.option("--resume", is_flag=True,
              help="Continue from the newest complete checkpoint in logging.output_dir (settings that differ "
                   "from that run's are listed).")
@click.option("--overwrite", is_flag=True,
              help="Start again where logging.output_dir holds an earlier run: its checkpoints, final model, "
                   "metrics.jsonl and best.json are removed once the new run has loaded its model and data; "
                   "other files there stay.")
@click.option("--skip-bad-records", "--skip-bad", "skip_bad_records", is_flag=True,
              help="Skip malformed records (and report how many) instead of stopping at the first.")
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
@click.option("--smoke", is_flag=True,
              help="Check CONFIG before a long run: a few steps on a sample of its pairs, an evaluation, "
                   "a checkpoint save and a resume, then the projected wall time and peak memory of the "
                   "full run. Writes only to a temporary folder; exit code 1 if anything failed.")
def train(config, overrides, resume, overwrite, skip_bad_records, no_progress, smoke):
    """Train a policy with DPO as CONFIG (YAML) says.

    With no CONFIG, runs the bundled smoke config: a tiny model and a synthetic preference
    set, under a minute on a laptop CPU, ending with validation accuracy and KL.
    """
    from tqdm.auto import tqdm

    from ..run import run_training

    if smoke and (resume or overwrite):
        raise click.UsageError("--smoke writes only to a temporary folder: --resume and --overwrite do not apply")
    if skip_bad_records:
        overrides = (*overrides, "data.on_bad_record=skip")
    cfg = load_train_config(config, overrides)
    click.echo(f"config: {cfg.source}", err=True)
    if smoke:
        from ..smoke import run_smoke

        run_smoke(cfg, echo=click.echo)
        return
    # The bundled smoke run replaces its own earlier outputs/smoke: running it again is what it is for.
    overwrite = overwrite or (config is None and not resume)
    run_training(cfg, resume=resume, overwrite=overwrite, progress=not no_progress,
                 echo=lambda line: tqdm.write(line))
