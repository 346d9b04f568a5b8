"""The `molden` command: each subcommand parses options, builds a config and calls one library
function (one module per command in this package); the library never imports the CLI."""

from __future__ import annotations

import sys


import typer

from molden import __version__
from molden.cli import benchmark, demo, export, inspect, models, plot, preprocess, relax, train

app = typer.Typer(
    help="molden: denoising for molecular and materials graph neural networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"molden {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print molden's version and exit"
    ),
) -> None:
    """molden: denoising for molecular and materials graph neural networks."""


app.command()(preprocess.preprocess)
app.command()(inspect.inspect)
app.command()(export.export)
app.command()(demo.demo)
app.command()(models.models)
app.command()(train.pretrain)
app.command()(train.finetune)
app.command()(train.evaluate)
app.command()(plot.plot)
app.command()(relax.relax)
app.command()(benchmark.benchmark)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
