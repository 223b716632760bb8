"""The `edgefn` app: its top-level commands and its groups, each group from the module of its name."""

from __future__ import annotations

import typer

from edgefn.cli import bundle, cloud, fleet, fn, model, profile, run

app = typer.Typer(help="edgefn: MQTT-triggered, sandboxed functions with on-device inference.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
for command in (run.run, run.status, run.demo, run.version):
    app.command()(command)
app.add_typer(fn.fn_app, name="fn")
app.add_typer(model.model_app, name="model")
app.add_typer(cloud.cloud_app, name="cloud")
app.add_typer(profile.profile_app, name="profile")
app.add_typer(bundle.bundle_app, name="bundle")
app.add_typer(fleet.fleet_app, name="fleet")

if __name__ == "__main__":
    app()
