"""`edgefn journal ack-damage`: an operator has seen the journal's damage, and the daemon is ok again."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from edgefn.cli._toolkit import cli_errors, out

journal_app = typer.Typer(help="The daemon's journal of events and answers.", no_args_is_help=True)


@journal_app.command("ack-damage")
def ack_damage_cmd(
    state_dir: Annotated[Path | None, typer.Option(help="The daemon's --state-dir (default: $XDG_STATE_HOME/edgefn, "
                                                        "else ~/.local/state/edgefn).")] = None,
) -> None:
    """Acknowledge the journal damage the daemon reports (a damaged, deleted or older journal, and the
    events lost with it): /healthz says ok again instead of degraded. The running daemon need not stop."""
    from edgefn.config import default_state_dir
    from edgefn.journal.mark import acknowledge_damage

    with cli_errors():
        seen = acknowledge_damage((state_dir or default_state_dir()) / "inbox.sqlite")
    for what in seen:
        out.print(f"acknowledged: {escape(what)}", highlight=False, soft_wrap=True)
    if not seen:
        out.print("no journal damage to acknowledge", highlight=False)
