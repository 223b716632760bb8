"""The `edgefn` app: its top-level commands and its groups, each group from the module of its name."""

from __future__ import annotations

from typing import Annotated

import typer

from edgefn.cli import bundle, cloud, fleet, fn, journal, model, profile, run, service

# -h as well as --help, on every command (click hands it down to the groups' contexts).
app = typer.Typer(help="edgefn: MQTT-triggered, sandboxed functions with on-device inference.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _print_version(asked: bool) -> None:
    if asked:
        import importlib.metadata as md

        typer.echo(f"edgefn {md.version('edgefn')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print edgefn's version and exit (`edgefn version`: with its runtimes).")] = False,
) -> None:
    """edgefn: MQTT-triggered, sandboxed functions with on-device inference."""


for command in (run.run, run.status, run.demo, run.version):
    app.command()(command)
app.add_typer(fn.fn_app, name="fn")
app.add_typer(model.model_app, name="model")
app.add_typer(cloud.cloud_app, name="cloud")
app.add_typer(profile.profile_app, name="profile")
app.add_typer(bundle.bundle_app, name="bundle")
app.add_typer(fleet.fleet_app, name="fleet")
app.add_typer(service.service_app, name="service")
app.add_typer(journal.journal_app, name="journal")

if __name__ == "__main__":
    app()
