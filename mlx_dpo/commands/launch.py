"""`mlx-dpo launch`: one DPO run over several machines (MLX ring backend, uneven split)."""
from __future__ import annotations

import os
import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--hostfile", required=True, type=click.Path(dir_okay=False),
              help="JSON list of machines in rank order, mlx.launch's format (configs/hosts.example.json).")
@click.option("--split", default=None, metavar="SHARES|auto",
              help="Share of every global batch per rank, e.g. 0.65,0.35, or auto (probe steps). "
                   "Default: compute.split of CONFIG.")
@click.option("--port", default=32323, show_default=True, type=click.IntRange(1024, 65000),
              help="First TCP port: the ring uses one per address, the control link the next one.")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="File holding the shared secret, at this path on every machine (mode 600). "
                   "Default: $MLX_DPO_SECRET_FILE, else the secret in $MLX_DPO_SECRET, else a fresh "
                   "random secret for this run.")
@click.option("--python", "python", default=sys.executable, show_default="this Python",
              help="Python interpreter with mlx-dpo installed, on every machine.")
@click.option("--cwd", default=None, help="Working directory on every machine. Default: the current one.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value on every rank (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from rank 0's newest checkpoint.")
@click.option("--overwrite", is_flag=True,
              help="Start again where logging.output_dir holds an earlier run (as `mlx-dpo train --overwrite`).")
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
@click.option("--dry-run", is_flag=True, help="Print each rank's command and exit.")
def launch(config, hostfile, split, port, secret_file, python, cwd, overrides, resume, overwrite,
           no_progress, dry_run):
    """Train CONFIG on every machine in --hostfile: one rank per machine, rank 0 first.
    With no CONFIG, the bundled smoke run (as `mlx-dpo train`).

    Each global batch (training.batch_size x ranks pairs per micro-batch) is divided by the
    split; gradients are averaged per example, so an update equals one machine's update on the
    same global batch. Only rank 0 logs and writes checkpoints. Remote machines are reached
    with ssh (key-based login) and need the same config, data and model (paths may differ when
    relative to --cwd). See docs/distributed.md.
    """
    from .train import load_train_config
    from ..distributed.hostfile import read_hostfile, ring_addresses
    from ..distributed.launcher import check_tools, plan, run_ranks, write_ring_file
    from ..distributed.secret import SECRET_ENV, SECRET_FILE_ENV, new_secret
    from ..distributed.split import parse_split

    if resume and overwrite:
        raise click.UsageError("--resume continues the run in logging.output_dir, --overwrite deletes it: pass one")
    hosts, _ = read_hostfile(hostfile)
    check_tools(hosts, python)
    if split is not None:
        parse_split(split, len(hosts), "--split")
    args = [*overrides, f"compute.num_devices={len(hosts)}", *([f"compute.split={split}"] if split else [])]
    load_train_config(config, tuple(args))  # every rank would refuse a bad config: say so once, here
    train_args = [*([config] if config else []), *[x for a in args for x in ("--set", a)]]
    train_args += [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite),
                                         ("--no-progress", no_progress)) if on]
    addresses, control_port = ring_addresses(hosts, port)
    secret_file = secret_file or os.environ.get(SECRET_FILE_ENV)
    secret = None if secret_file else (os.environ.get(SECRET_ENV) or new_secret())
    cwd = cwd or os.getcwd()
    ring_file = write_ring_file(addresses)
    try:
        commands = plan(hosts, addresses, control_port, train_args, python, cwd, secret, secret_file, ring_file)
        if dry_run:
            for command in commands:
                click.echo(command.show())
            return
        code = run_ranks(commands, cwd, echo=lambda line: click.echo(line, err=True))
    finally:
        os.unlink(ring_file)
    sys.exit(code)
