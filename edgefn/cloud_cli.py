"""`edgefn cloud ...`: the cloud side, from the same command: the endpoint devices hand inference off to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from edgefn.errors import ConfigError, EdgefnError

cloud_app = typer.Typer(help="The cloud side: serve models over the Open Inference Protocol v2 (KServe V2), "
                             "the endpoint devices hand inference off to.", no_args_is_help=True)


@cloud_app.command("serve")
def serve(
    models: Annotated[list[Path], typer.Option("--models", "-m", help="Folder of model folders to serve, each "
                                                                      "under its model.json name (repeatable).")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on (0: any free one, "
                                                             "printed at start).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    delay_ms: Annotated[float, typer.Option(min=0, help="Hold every request this long before answering, "
                                                        "as a network would (for benchmarks).")] = 0.0,
    auth_header: Annotated[str | None, typer.Option(help="Refuse (401) requests without this header, e.g. "
                                                         "Authorization; its value comes from --auth-env.")] = None,
    auth_env: Annotated[str | None, typer.Option(help="Environment variable holding the value --auth-header "
                                                      "must have (never a flag: flags show in ps).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the ONNX models of a models folder over OIP v2 REST (health, metadata, infer; JSON and binary
    tensors) until Ctrl-C or SIGTERM."""
    from edgefn.cli import _fail, _setup_logging, console

    try:
        from cloud_sync.serve import OipEndpoint, create_app, serve_forever
    except ImportError as exc:
        _fail(EdgefnError(f"the cloud endpoint needs {exc.name}: pip install 'edgefn[cloud]'"))
    _setup_logging(log_level)
    try:
        endpoint = OipEndpoint.from_folders(models, delay_ms=delay_ms, auth=_auth(auth_header, auth_env))
    except EdgefnError as exc:
        _fail(exc)
    try:
        app = create_app(endpoint)
        names = ", ".join(n if m.backend else f"{n} (not ready)" for n, m in endpoint.models.items())
        serve_forever(app, host=host, port=port, on_listening=lambda url: console.print(
            f"serving {names} (Open Inference Protocol v2) on {url}", markup=False, highlight=False, soft_wrap=True))
    except EdgefnError as exc:
        _fail(exc)
    finally:
        endpoint.close()


def _auth(header: str | None, env: str | None) -> tuple[str, str] | None:
    if header is None and env is None:
        return None
    if not header or not env:
        raise ConfigError("--auth-header and --auth-env go together")
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"--auth-env names {env}, which is not set (or empty)")
    return header, value
