"""`edgefn service install`: run edgefn as a systemd service (the unit, /etc/edgefn's config and
environment file, then systemd told)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from edgefn.cli._toolkit import cli_errors, out

service_app = typer.Typer(help="Run edgefn as a system service (systemd).", no_args_is_help=True)


@service_app.command("install")
def install_cmd(
    root: Annotated[Path, typer.Option(help="Install under this folder instead of / (an image being built, a "
                                            "test); systemctl is run only for /.")] = Path("/"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be done, and do nothing.")] = False,
    enable: Annotated[bool, typer.Option(help="Enable and start the service (under / only).")] = True,
) -> None:
    """Install edgefn.service (Type=notify, a watchdog, state in /var/lib/edgefn), /etc/edgefn/config.toml and
    /etc/edgefn/edgefn.env (both kept when already there), then `systemctl daemon-reload` and `enable --now`."""
    from edgefn.service.install import install

    with cli_errors():
        steps = install(root, enable=enable, dry_run=dry_run)
    for step in steps:
        out.print(("would " if dry_run else "") + escape(str(step)), highlight=False, soft_wrap=True)
    if not dry_run:
        out.print("next: edit /etc/edgefn/config.toml (and the secrets in edgefn.env); "
                  "`systemctl restart edgefn` after a change, `journalctl -u edgefn` for its log", highlight=False,
                  soft_wrap=True)
