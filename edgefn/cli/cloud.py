"""`edgefn cloud serve`: the cloud side from the same command: the inference endpoint devices hand work
off to (Open Inference Protocol v2) and, with --data, the fleet server. `edgefn cloud check`: whether
an endpoint (ours, MLServer, KServe, Triton) can take a device's models over."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from edgefn.cli._toolkit import (
    CLOUD_MODEL_HELP,
    cli_errors,
    console,
    fail,
    name_values,
    out,
    print_json,
    setup_logging,
    token_from_env,
)
from edgefn.errors import ConfigError, EdgefnError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cloud_sync.serve import Tls
    from edgefn.offload.check import ModelCheck

cloud_app = typer.Typer(help="The cloud side: serve models over the Open Inference Protocol v2 (KServe V2), "
                             "the endpoint devices hand inference off to, and the fleet server that rolls "
                             "releases out to devices.", no_args_is_help=True)


@cloud_app.command("serve")
def serve(
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of model folders to serve, "
                                                                             "each under its model.json name "
                                                                             "(repeatable).")] = None,
    data: Annotated[Path | None, typer.Option(help="Serve the fleet too: its state (fleet.sqlite) and TUF "
                                                   "repository live in this folder.")] = None,
    db: Annotated[str | None, typer.Option(help="The fleet's database URL instead of the SQLite file in --data, "
                                                "e.g. postgresql://user@host/fleet.")] = None,
    fleet_root: Annotated[Path | None, typer.Option(help="The TUF root to trust (the operator's 1.root.json): "
                                                         "needed at the first start, kept in --data after it; a "
                                                         "root is never taken from the network.")] = None,
    token_file: Annotated[Path | None, typer.Option(help="File holding the operator's bearer token, which "
                                                         "publishing, enrolling and rollout changes must carry (the "
                                                         "operator.token of `edgefn fleet keys init`).")] = None,
    token_env: Annotated[str | None, typer.Option(help="Environment variable holding that token instead.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve the fleet without credentials: anyone may "
                                                              "publish, roll out and report as any device (a lab "
                                                              "only; logged loudly).")] = False,
    max_bundle_mib: Annotated[int, typer.Option(min=1, help="Largest bundle a publish may upload (MiB).")] = 1024,
    max_report_kib: Annotated[int, typer.Option(min=1, help="Largest device report, and other fleet request "
                                                            "(KiB).")] = 64,
    ssl_certfile: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate chain (PEM); "
                                                           "needs --ssl-keyfile.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="The private key (PEM) of --ssl-certfile.")] = None,
    step_s: Annotated[float, typer.Option(min=0.05, help="Seconds between two steps of the rollout "
                                                         "engine.")] = 0.5,
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
    tensors), and with --data the fleet (API, TUF repository, rollouts, the page at /), until Ctrl-C or SIGTERM."""
    try:
        from cloud_sync.serve import OipEndpoint, create_app
    except ImportError as exc:
        fail(EdgefnError(f"the cloud endpoint needs {exc.name}: pip install 'edgefn[cloud]'"))
    setup_logging(log_level)
    with cli_errors():
        tls = _tls(ssl_certfile, ssl_keyfile)
    if data is not None:
        return _serve_fleet(data, models or [], host=host, port=port, db=db, fleet_root=fleet_root,
                            token=_operator_token(token_file, token_env), insecure=insecure, step_s=step_s,
                            delay_ms=delay_ms, auth_header=auth_header, auth_env=auth_env, tls=tls,
                            max_bundle_mib=max_bundle_mib, max_report_kib=max_report_kib)
    if not models:
        fail(ConfigError("give --models DIR (the inference endpoint), --data DIR (the fleet server), or both"))
    if db is not None or fleet_root is not None or token_env is not None or token_file is not None or insecure:
        fail(ConfigError("--db, --fleet-root, --token-file, --token-env and --insecure are the fleet server's: give "
                         "--data DIR too"))
    assert models is not None
    with cli_errors():
        endpoint = OipEndpoint.from_folders(models, delay_ms=delay_ms, auth=_auth(auth_header, auth_env))
    names = ", ".join(n if m.backend else f"{n} (not ready)" for n, m in endpoint.models.items())
    _serve(create_app(endpoint), f"{names} (Open Inference Protocol v2)", host=host, port=port, close=endpoint.close,
           tls=tls)


@cloud_app.command("check")
def check(
    url: Annotated[str, typer.Argument(help="The endpoint, e.g. http://HOST:8080.")],
    functions: Annotated[list[Path] | None, typer.Option("--functions", "-f", help="Check the models these "
                                                                                   "functions use (a function "
                                                                                   "folder or a folder of them; "
                                                                                   "repeatable).")] = None,
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of models (repeatable; "
                                                                             "default: models).")] = None,
    cloud_model: Annotated[list[str] | None, typer.Option(help=CLOUD_MODEL_HELP)] = None,
    timeout_s: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for each answer.")] = 10.0,
    auth_header: Annotated[str | None, typer.Option(help="Send this header, e.g. Authorization; its value "
                                                         "comes from --auth-env.")] = None,
    auth_env: Annotated[str | None, typer.Option(help="Environment variable holding --auth-header's "
                                                      "value.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """For each model the functions use (default: every model in --models): is it ready on the endpoint, do
    its names, datatypes and shapes agree with the local model.json, and does one real inference of its
    validation sample answer as the local model does. Exit code 1 when a model cannot be handed off."""
    from edgefn.functions.build import discover
    from edgefn.functions.manifest import load_manifest
    from edgefn.inference.registry import ModelRegistry
    from edgefn.offload.check import check_model
    from edgefn.offload.client import CloudClient

    with cli_errors():
        registry = ModelRegistry(models or [Path("models")])
        if functions:
            names = sorted({m for folder in discover(functions) for m in load_manifest(folder).models.use})
        else:
            names = registry.names()
        for name in names:
            registry.info(name)  # a model the functions use and --models lacks: say so before any call
        with CloudClient(url, model_map=name_values("--cloud-model", cloud_model), timeout_s=timeout_s,
                         retries=0, auth_header=auth_header, auth_env=auth_env) as client:
            client.server_metadata()  # one line for a server that is no OIP endpoint, not a table of 404s
            checks = [check_model(client, registry, name) for name in names]
    if as_json:
        print_json({"url": url, "ok": all(c.ok for c in checks), "models": [c.to_json() for c in checks]})
    else:
        out.print(_check_table(url, checks))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _check_table(url: str, checks: list[ModelCheck]) -> Table:
    table = Table(title=f"can {url} take these models over?")
    for column in ("model", "there", "ready", "sent", "answered", "declared there", "agreement with here",
                   "max diff", "verdict"):
        table.add_column(column)
    for c in checks:
        agreement = "-" if c.agreement is None else f"{c.agreement:.1%} of {c.rows} ({c.variant})"
        diff = "-" if c.max_difference is None else f"{c.max_difference:.2g}"
        verdict = "[green]ok[/]" if c.ok else f"[red]no[/]: {escape(c.problem or '')}"
        table.add_row(c.model, escape(c.served_as), "yes" if c.ready else "[red]no[/]", escape("\n".join(c.inputs)),
                      escape("\n".join(c.outputs)) or "-", escape(c.declared), agreement, diff, verdict)
    return table


def _serve_fleet(data: Path, models: list[Path], *, host: str, port: int, db: str | None, fleet_root: Path | None,
                 token: str | None, insecure: bool, step_s: float, delay_ms: float, auth_header: str | None,
                 auth_env: str | None, tls: Tls | None, max_bundle_mib: int, max_report_kib: int) -> None:
    from cloud_sync.fleet.server import FleetLimits, FleetService

    limits = FleetLimits(report_bytes=max_report_kib << 10, request_bytes=max_report_kib << 10,
                         bundle_bytes=max_bundle_mib << 20)
    with cli_errors():
        service = FleetService(data, db_url=db, models=models, fleet_root=fleet_root, token=token, insecure=insecure,
                               limits=limits, delay_ms=delay_ms, auth=_auth(auth_header, auth_env))
    if insecure:
        console.print("[bold red]INSECURE:[/] this fleet server serves anyone (--insecure): never expose it")
    service.engine.start(step_s)
    served = "the fleet" + (f" and {', '.join(service.endpoint.models)} (Open Inference Protocol v2)"
                            if service.endpoint is not None else "")
    _serve(service.app, served, host=host, port=port, close=service.close, tls=tls)


def _operator_token(token_file: Path | None, token_env: str | None) -> str | None:
    if token_file is not None and token_env is not None:
        fail(ConfigError("give --token-file or --token-env, not both"))
    if token_file is None:
        with cli_errors():
            return token_from_env(token_env, fallback=None)
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        fail(ConfigError(f"--token-file {token_file}: cannot read it ({exc.strerror or exc})"))
    if not token:
        fail(ConfigError(f"--token-file {token_file} is empty"))
    return token


def _tls(certfile: Path | None, keyfile: Path | None) -> Tls | None:
    from cloud_sync.serve import Tls

    if (certfile is None) != (keyfile is None):
        raise ConfigError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    return Tls(certfile, keyfile) if certfile is not None and keyfile is not None else None


def _serve(app: FastAPI, what: str, *, host: str, port: int, close: Callable[[], None], tls: Tls | None) -> None:
    """Serve `app` in the foreground until SIGINT or SIGTERM; `close` then releases what it served."""
    from cloud_sync.serve import serve_forever

    try:
        with cli_errors():
            serve_forever(app, host=host, port=port, tls=tls, on_listening=lambda url: console.print(
                f"serving {what} on {url}", markup=False, highlight=False, soft_wrap=True))
    finally:
        close()


def _auth(header: str | None, env: str | None) -> tuple[str, str] | None:
    from edgefn.offload.client import header_secret

    return header_secret(header, env, os.environ, names=("--auth-header", "--auth-env"))
