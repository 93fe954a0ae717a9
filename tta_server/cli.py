"""The ``tta-server`` command line: ``serve``, ``models`` and ``train``."""

from __future__ import annotations

import typer

from tta_server.training.cli import train_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Test-time adaptation inference server.")
app.command("train")(train_command)


@app.callback()
def _root() -> None:
    """Test-time adaptation inference server."""


def main() -> None:
    """Console-script entry point."""
    app()
