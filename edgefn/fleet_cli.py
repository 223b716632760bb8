"""`edgefn fleet ...`: the operator's side of fleet rollout (keys, push, rollouts, devices).

The Typer apps live here; `edgefn/bundle_cli.py` adds `bundle build`, `fleet keys init` and
`fleet push` to them, this module the commands that talk to the fleet server about rollouts and
devices."""

from __future__ import annotations

import typer

fleet_app = typer.Typer(help="Roll functions and models out to a fleet: keys, push, rollouts, devices.",
                        no_args_is_help=True)
keys_app = typer.Typer(help="The TUF signing keys of a fleet's releases.", no_args_is_help=True)
rollout_app = typer.Typer(help="Canary, waves and health gates: create, watch, pause, resume, abort.",
                          no_args_is_help=True)
fleet_app.add_typer(keys_app, name="keys")
fleet_app.add_typer(rollout_app, name="rollout")
