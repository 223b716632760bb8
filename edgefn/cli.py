"""`edgefn`: run the daemon, build and try functions, and the demo."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefn.bundle_cli import bundle_app
from edgefn.cloud_cli import cloud_app
from edgefn.errors import EdgefnError
from edgefn.fleet_cli import fleet_app
from edgefn.model_cli import model_app
from edgefn.profile_cli import profile_app
from edgefn.protocol.offload import POLICIES

app = typer.Typer(help="edgefn: MQTT-triggered, sandboxed functions with on-device inference.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
fn_app = typer.Typer(help="Write, build and try functions.", no_args_is_help=True)
app.add_typer(fn_app, name="fn")
app.add_typer(model_app, name="model")
app.add_typer(cloud_app, name="cloud")
app.add_typer(profile_app, name="profile")
app.add_typer(bundle_app, name="bundle")
app.add_typer(fleet_app, name="fleet")
console = Console(stderr=True)
out = Console()


def _fail(exc: Exception) -> None:
    # The message is text, not markup: "[/tmp/x]" or "[models]" in it must print as written.
    console.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(2)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    broker: Annotated[str | None, typer.Option(help="mqtt://HOST:PORT or mqtts://HOST:PORT [env EDGEFN_BROKER]")] = None,
    functions: Annotated[list[Path] | None, typer.Option("--functions", "-f", help="Function folder, or a folder of them (repeatable).")] = None,
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of models (repeatable).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Journal and compiled-component cache.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve /metrics and /healthz on 127.0.0.1:PORT.")] = None,
    username: Annotated[str | None, typer.Option(help="Broker user name [env EDGEFN_USERNAME].")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA certificate of the broker (enables TLS).")] = None,
    cert_file: Annotated[Path | None, typer.Option(help="Client certificate (PEM) for mutual TLS.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Client private key (PEM) for mutual TLS.")] = None,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (the broker keeps its session).")] = None,
    journal: Annotated[str | None, typer.Option(help="disk (default: events survive a crash) or memory.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with any of these settings.")] = None,
    build: Annotated[bool, typer.Option(help="Build functions whose component is missing or stale.")] = True,
    model_variant: Annotated[list[str] | None, typer.Option(help="MODEL=VARIANT: run MODEL as this variant of its "
                                                                 "model.json (repeatable; default: the best one that runs here).")] = None,
    profile: Annotated[str | None, typer.Option(help="Device profile by name (see `edgefn profile list`; "
                                                     "default: detected).")] = None,
    cloud: Annotated[str | None, typer.Option(help="Cloud inference endpoint (Open Inference Protocol v2), "
                                                   "e.g. http://HOST:8000 [env EDGEFN_CLOUD_URL].")] = None,
    cloud_model: Annotated[list[str] | None, typer.Option(help="MODEL=NAME: the endpoint serves MODEL under "
                                                                "another name (repeatable).")] = None,
    offload: Annotated[str | None, typer.Option(help="Override every function's offload policy: "
                                                     f"{', '.join(POLICIES)}.")] = None,
    device_root: Annotated[Path | None, typer.Option(help="Read /proc, /sys, /dev and /etc under this folder "
                                                          "(detection and sensors; default /).")] = None,
    delegate_dirs: Annotated[list[Path] | None, typer.Option("--delegate-dirs", help="Folder to look for delegate "
                                                              "libraries in first (repeatable).")] = None,
    fleet: Annotated[str | None, typer.Option(help="Fleet server URL (edgefn cloud serve --data): install the "
                                                   "releases it assigns to this device [env EDGEFN_FLEET_URL].")] = None,
    device_id: Annotated[str | None, typer.Option(help="This device's id in the fleet (default: the host name).")] = None,
    group: Annotated[str | None, typer.Option(help="The fleet group of this device (default: default).")] = None,
    fleet_root: Annotated[Path | None, typer.Option(help="The fleet's TUF root (1.root.json of `edgefn fleet keys "
                                                         "init`); needed the first time only.")] = None,
    fleet_poll: Annotated[float | None, typer.Option(help="Seconds between polls of the fleet server (default 5).")] = None,
    batch_max: Annotated[int | None, typer.Option(help="Most concurrent infer calls of one model stacked into one "
                                                      "inference, here or on the cloud (default 16; 1: off).")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="Longest an infer call waits for others to stack with, "
                                                              "only while other calls are in flight (default 2).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM.

    The broker password comes from EDGEFN_PASSWORD or the config file, never from a flag.
    """
    from edgefn.config import load_settings
    from edgefn.daemon import Daemon

    _setup_logging(log_level)
    try:
        settings = load_settings(config, broker=broker, functions=functions, models=models, state_dir=state_dir,
                                 metrics_port=metrics_port, username=username, ca_file=ca_file,
                                 cert_file=cert_file, key_file=key_file, client_id=client_id, journal=journal,
                                 model_variants=_pairs("--model-variant", model_variant), profile=profile,
                                 cloud_model_map=_pairs("--cloud-model", cloud_model),
                                 device_root=device_root, delegate_dirs=delegate_dirs, cloud_url=cloud,
                                 offload=offload, fleet_url=fleet, device_id=device_id, group=group,
                                 fleet_root=fleet_root, fleet_poll_s=fleet_poll, batch_max=batch_max,
                                 batch_wait_ms=batch_wait_ms)
        if build and not settings.fleet_only:
            _build_stale(settings.functions)
        daemon = Daemon(settings)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        daemon.start()
        if daemon.observe:
            logging.getLogger("edgefn").info("metrics on http://127.0.0.1:%d/metrics", daemon.observe.port)
        stop.wait()
        logging.getLogger("edgefn").info("stopping: draining events in hand")
        daemon.stop()
    except EdgefnError as exc:
        _fail(exc)


def _pairs(flag: str, values: list[str] | None) -> dict[str, str] | None:
    """["a=b", ...] -> {"a": "b", ...}; None when the flag was not given."""
    if not values:
        return None
    pairs = [v.split("=", 1) for v in values]
    bad = [v for v, p in zip(values, pairs, strict=True) if len(p) != 2 or not all(p)]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} is not NAME=VALUE", param_hint=flag)
    return dict(pairs)


def _build_stale(paths: list[Path]) -> None:
    from edgefn.functions.build import build as build_function
    from edgefn.functions.build import discover, needs_build
    from edgefn.functions.manifest import load_manifest

    for folder in discover(paths):
        if needs_build(folder, load_manifest(folder)):
            with console.status(f"building {folder} (componentize-py, about 10 s)"):
                build_function(folder)


@fn_app.command("new")
def fn_new(
    name: Annotated[str, typer.Argument(help="Function name (a-z, 0-9, '-', '_').")],
    parent: Annotated[Path, typer.Option("--dir", help="Folder to create it in.")] = Path("."),
) -> None:
    """Scaffold a Python function: edgefn.toml, app.py and a sample event.json."""
    from edgefn.functions.build import scaffold

    try:
        target = scaffold(name, parent)
    except EdgefnError as exc:
        _fail(exc)
    out.print(f"created {target}/ (edgefn.toml, app.py, event.json)\n"
              f"next: edgefn fn build {target} && edgefn fn invoke {target} --topic sensors/dev1/{name} --payload @{target}/event.json")


@fn_app.command("build")
def fn_build(
    folders: Annotated[list[Path], typer.Argument(help="Function folders.")],
    state_dir: Annotated[Path | None, typer.Option(help="Where to cache the precompiled component.")] = None,
) -> None:
    """Compile functions to WebAssembly components (componentize-py) and precompile them for this CPU."""
    from edgefn.config import default_state_dir
    from edgefn.functions.build import build as build_function
    from edgefn.functions.sandbox import Runtime

    try:
        with Runtime((state_dir or default_state_dir()) / "components") as runtime:
            for folder in folders:
                t0 = time.perf_counter()
                with console.status(f"componentize-py {folder}"):
                    wasm = build_function(folder)
                t1 = time.perf_counter()
                with console.status(f"precompiling {wasm.name} for this CPU"):
                    runtime.load(wasm)
                t2 = time.perf_counter()
                out.print(f"built {wasm} ({wasm.stat().st_size / 1e6:.1f} MB) in {t1 - t0:.1f} s, precompiled in {t2 - t1:.1f} s")
    except EdgefnError as exc:
        _fail(exc)


def _read_payload(payload: str) -> bytes:
    if payload.startswith("@"):
        path = Path(payload[1:])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    return payload.encode()


@fn_app.command("invoke")
def fn_invoke(
    folder: Annotated[Path, typer.Argument(help="Function folder.")],
    topic: Annotated[str, typer.Option(help="Topic the event arrives on, e.g. sensors/dev1/digits.")],
    payload: Annotated[str, typer.Option(help="Payload text, or @FILE to read it from a file.")],
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of models (repeatable).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Compiled-component cache.")] = None,
) -> None:
    """Run one event through a function, with no broker, and print the messages it would publish."""
    from edgefn.config import default_state_dir
    from edgefn.daemon import FunctionHost, error_message
    from edgefn.errors import FunctionError
    from edgefn.events import Event
    from edgefn.functions.build import component_path, needs_build
    from edgefn.functions.manifest import load_manifest
    from edgefn.functions.sandbox import FunctionSandbox, Runtime
    from edgefn.functions.state import StateStore
    from edgefn.inference.registry import ModelRegistry

    body = _read_payload(payload)
    try:
        manifest = load_manifest(folder)
        if needs_build(folder, manifest):
            _build_stale([folder])
        registry = ModelRegistry(models or [Path("models")])
        state = StateStore((state_dir or default_state_dir()) / "state.sqlite")
        with Runtime((state_dir or default_state_dir()) / "components") as runtime:
            sandbox = FunctionSandbox(runtime, manifest.model_copy(update={"limits": manifest.limits.model_copy(update={"instances": 1})}),
                                      component_path(folder, manifest), FunctionHost(manifest.name, registry, state))
            event = Event("invoke-1", topic, body, time.time() * 1000)
            try:
                messages, code = sandbox.handle(event), 0
            except FunctionError as exc:
                messages, code = [error_message(manifest, event, exc)], 1
            finally:
                sandbox.close()
                state.close()
    except EdgefnError as exc:
        _fail(exc)
    for m in messages:
        try:
            shown = json.dumps(json.loads(m.payload))
        except ValueError:
            shown = repr(m.payload)
        out.print(f"{m.topic} {shown}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def status(
    port: Annotated[int, typer.Option(help="The running daemon's --metrics-port.")] = 9108,
    as_json: Annotated[bool, typer.Option("--json", help="Print the daemon's /healthz document as JSON.")] = False,
) -> None:
    """What the running daemon says of itself: broker, journal, device profile, and per model the
    variant and delegate it runs on and why the others were passed over."""
    import json
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            doc = json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        _fail(EdgefnError(f"no daemon answers on {url} ({getattr(exc, 'reason', exc)}); "
                          "start it with --metrics-port"))
    if as_json:
        out.print_json(data=doc)
        return
    table = Table(title="edgefn status", show_header=False)
    for key in ("status", "broker", "profile", "inbox_events", "outbox_messages", "held_unacknowledged"):
        if key in doc:
            table.add_row(key.replace("_", " "), escape(str(doc[key])))
    table.add_row("functions", escape(", ".join(f"{n} {v}" for n, v in doc.get("functions", {}).items())))
    out.print(table)
    models = Table(title="models")
    for column in ("model", "variant", "delegate", "passed over"):
        models.add_column(column)
    for name, m in doc.get("models", {}).items():
        passed = "\n".join(f"{what}: {why}" for what, why in m.get("passed_over", []))
        models.add_row(name, m.get("variant", "?"), m.get("delegate", "?"), escape(passed) or "-")
    out.print(models)


@app.command()
def demo(
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    rate: Annotated[float, typer.Option(help="Sensor events per second.")] = 200.0,
    devices: Annotated[int, typer.Option(help="Simulated sensor devices.")] = 4,
) -> None:
    """The main job on embedded defaults: a local mosquitto, the daemon with the digits function,
    and simulated sensors publishing real handwritten-digit images; a live table shows how it goes."""
    from edgefn.demo import run_demo

    try:
        sys.exit(run_demo(duration=duration, rate=rate, devices=devices, console=out))
    except EdgefnError as exc:
        _fail(exc)


def _version_table() -> Table:
    import importlib.metadata as md

    table = Table(show_header=False, box=None)
    for pkg in ("edgefn", "wasmtime", "onnxruntime", "paho-mqtt"):
        try:
            table.add_row(pkg, md.version(pkg))
        except md.PackageNotFoundError:
            table.add_row(pkg, "not installed")
    return table


@app.command()
def version() -> None:
    """Show the versions of edgefn and the runtimes it uses."""
    out.print(_version_table())


if __name__ == "__main__":
    app()
