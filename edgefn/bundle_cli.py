"""`edgefn bundle build`, `edgefn fleet keys init` and `edgefn fleet push`: making and signing releases."""

from __future__ import annotations

import typer

from edgefn.fleet_cli import fleet_app, keys_app  # noqa: F401  (commands are added to them here)

bundle_app = typer.Typer(help="Pack functions, their models and a health check into one signed-ready bundle.",
                         no_args_is_help=True)
