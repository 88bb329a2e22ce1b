"""The `mlx-dpo` command: a click group whose subcommands live in mlx_dpo/commands/.

Only parsing and error mapping happen here: a UserError prints its message and exits with
its code (2 for bad input), with no traceback.
"""
from __future__ import annotations

import sys

import click

from . import __version__
from .errors import UserError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-dpo")
def main():
    """Direct Preference Optimization of language models on MLX.

    Run `mlx-dpo train` with no argument for a smoke run (under a minute) on a bundled tiny model.
    """


def _register() -> None:
    from .commands import train

    from .commands import convert as convert_cmd; main.add_command(convert_cmd.convert)  # noqa: E702
    from .commands import data as data_cmd; main.add_command(data_cmd.data)  # noqa: E702
    from .commands import doctor as doctor_cmd; main.add_command(doctor_cmd.doctor)  # noqa: E702
    from .commands import gates as gates_cmd; main.add_command(gates_cmd.gates)  # noqa: E702
    from .commands import init_check; main.add_command(init_check.init_check)  # noqa: E702
    from .commands import launch as launch_cmd; main.add_command(launch_cmd.launch)  # noqa: E702
    from .commands import monitor as monitor_cmd; main.add_command(monitor_cmd.monitor)  # noqa: E702
    main.add_command(train.train)
    # One line per command module; keep them sorted.


_register()
