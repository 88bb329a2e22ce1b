"""`mlx-dpo init-check`: the stage-3 model-initialisation checks, without training."""
from __future__ import annotations

import click


@click.command("init-check")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value, e.g. --set model.reference_model=path (repeatable).")
def init_check(config, overrides):
    """Check that the policy and reference of CONFIG are ready for DPO.

    The reference is frozen; the policy starts equal to the reference; their architectures
    match; their tokenizers agree (vocabulary, special tokens, chat template); the initial KL on
    a validation batch is below 1e-6. Each check is printed with its result. Exit code 0 when
    all pass, 1 when one fails, 2 for a bad config. With no CONFIG, checks the bundled smoke
    config. Training runs the same checks first (constraints.init_checks).
    """
    from ..config import check_files
    from ..data.pipeline import prepare_data
    from ..engines import make_engine, select_device
    from ..init_checks import check_run_start
    from .train import load_train_config

    cfg = load_train_config(config, (*overrides, "constraints.init_checks=true"))
    check_files(cfg)
    device = select_device(cfg)
    engine = make_engine(cfg, device)
    # The KL batch: one micro-batch as configured (no memory probe for `auto`: 4 pairs suffice).
    batch_size = cfg.training.batch_size if cfg.training.batch_size != "auto" else 4
    data = prepare_data(cfg, engine.tokenizer)
    check_run_start(cfg, engine, data, batch_size, 0, click.echo)  # raises InitCheckFailed: exit 1
