"""The `edgefn` command line: `main` declares the app and its groups, one module per group, and
`_toolkit` what they share (consoles, the error exit, the fleet server's call).

Run it as `edgefn`, `python -m edgefn` or `python -m edgefn.cli`; the app is `edgefn.cli.main:app`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `edgefn` scripts installed before the CLI became a package say `from edgefn.cli import app`.
    # Loaded on demand, so that importing one command module does not load every other.
    if name == "app":
        from edgefn.cli.main import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
