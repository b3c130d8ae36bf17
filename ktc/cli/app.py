"""The typer application every verb module registers its command on."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="ktc",
    help="Compile Mixture-of-Experts models into one artifact and run them on this machine's CPU (and GPU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
