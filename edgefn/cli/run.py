"""The top-level commands: `edgefn run` (the daemon), `status` (ask it how it does), `demo` (the whole
path on a private broker) and `version`.

`main` registers each public function here as the command of its name.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table

from edgefn.cli._toolkit import (
    CLOUD_MODEL_HELP,
    LogLevel,
    build_stale,
    cli_errors,
    fail,
    name_values,
    out,
    print_json,
    setup_logging,
)
from edgefn.errors import EdgefnError
from edgefn.protocol.offload import Policy


def run(
    broker: Annotated[str | None, typer.Option(help="mqtt://HOST:PORT or mqtts://HOST:PORT (default: mqtt://127.0.0.1:1883; env EDGEFN_BROKER).")] = None,
    functions: Annotated[list[Path] | None, typer.Option("--functions", "-f", help="Function folder, or a folder of them (repeatable; default: ./functions).")] = None,
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of models (repeatable; default: ./models).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Journal, state and compiled-component cache (default: $XDG_STATE_HOME/edgefn, else ~/.local/state/edgefn).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve /metrics and /healthz on 127.0.0.1:PORT (0: any free port; default: not served).")] = None,
    username: Annotated[str | None, typer.Option(help="Broker user name (env EDGEFN_USERNAME).")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA certificate of the broker (enables TLS).")] = None,
    cert_file: Annotated[Path | None, typer.Option(help="Client certificate (PEM) for mutual TLS.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Client private key (PEM) for mutual TLS.")] = None,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (the broker keeps its session; default: edgefn-HOSTNAME).")] = None,
    journal: Annotated[Literal["disk", "memory"] | None,
                       typer.Option(help="disk (default: events survive a crash) or memory.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with any of these settings.")] = None,
    build: Annotated[bool, typer.Option(help="Build functions whose component is missing or stale.")] = True,
    model_variant: Annotated[list[str] | None, typer.Option(help="MODEL=VARIANT: run MODEL as this variant of its "
                                                                 "model.json (repeatable; default: the best one that runs here).")] = None,
    profile: Annotated[str | None, typer.Option(help="Device profile by name (see `edgefn profile list`; "
                                                     "default: detected).")] = None,
    cloud: Annotated[str | None, typer.Option(help="Cloud inference endpoint (Open Inference Protocol v2), "
                                                   "e.g. http://HOST:8000 (env EDGEFN_CLOUD_URL).")] = None,
    cloud_model: Annotated[list[str] | None, typer.Option(help=CLOUD_MODEL_HELP)] = None,
    offload: Annotated[Policy | None, typer.Option(help="Override every function's offload policy.")] = None,
    device_root: Annotated[Path | None, typer.Option(help="Read /proc, /sys, /dev and /etc under this folder "
                                                          "(detection and sensors; default /).")] = None,
    delegate_dirs: Annotated[list[Path] | None, typer.Option("--delegate-dirs", help="Folder to look for delegate "
                                                              "libraries in first (repeatable).")] = None,
    fleet: Annotated[str | None, typer.Option(help="Fleet server URL (edgefn cloud serve --data): install the "
                                                   "releases it assigns to this device (env EDGEFN_FLEET_URL).")] = None,
    device_id: Annotated[str | None, typer.Option(help="This device's id in the fleet (default: the host name).")] = None,
    group: Annotated[str | None, typer.Option(help="The fleet group of this device (default: default).")] = None,
    fleet_root: Annotated[Path | None, typer.Option(help="The fleet's TUF root (1.root.json of `edgefn fleet keys "
                                                         "init`); needed the first time only.")] = None,
    device_token_file: Annotated[Path | None, typer.Option(help="File holding this device's fleet credential (from "
                                                                "`edgefn fleet devices enroll`; or set "
                                                                "EDGEFN_DEVICE_TOKEN).")] = None,
    fleet_poll: Annotated[float | None, typer.Option(help="Seconds between polls of the fleet server (default 5).")] = None,
    batch_max: Annotated[int | None, typer.Option(help="Most concurrent infer calls of one model stacked into one "
                                                      "inference, here or on the cloud (default 16; 1: off).")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="Longest an infer call waits for others to stack with, "
                                                              "only while other calls are in flight (default 2).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes that run the functions, a core each (default: "
                                                    "the cores less one; 0: in the daemon's own process).")] = None,
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False, help="How much the daemon says.")] = "info",
) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM.

    The broker password comes from EDGEFN_PASSWORD or the config file, never from a flag.
    """
    from edgefn.config import load_settings
    from edgefn.daemon import Daemon

    setup_logging(log_level)
    with cli_errors():
        settings = load_settings(config, broker=broker, functions=functions, models=models, state_dir=state_dir,
                                 metrics_port=metrics_port, username=username, ca_file=ca_file,
                                 cert_file=cert_file, key_file=key_file, client_id=client_id, journal=journal,
                                 model_variants=name_values("--model-variant", model_variant), profile=profile,
                                 cloud_model_map=name_values("--cloud-model", cloud_model),
                                 device_root=device_root, delegate_dirs=delegate_dirs, cloud_url=cloud,
                                 offload=offload, fleet_url=fleet, device_id=device_id, group=group,
                                 fleet_root=fleet_root, device_token_file=device_token_file,
                                 fleet_poll_s=fleet_poll, batch_max=batch_max,
                                 batch_wait_ms=batch_wait_ms, workers=workers)
        # A function that does not build is reported by the daemon (status, metrics, its error topic)
        # while the others serve.
        broken = build_stale(settings.functions, keep_going=True) if build and not settings.fleet_only else {}
        daemon = Daemon(settings, broken)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        daemon.start()
        if daemon.observe:
            logging.getLogger("edgefn").info("metrics on http://127.0.0.1:%d/metrics", daemon.observe.port)
        stop.wait()
        logging.getLogger("edgefn").info("stopping: draining events in hand")
        daemon.stop()


def status(
    port: Annotated[int, typer.Option(help="The running daemon's --metrics-port.")] = 9108,
    as_json: Annotated[bool, typer.Option("--json", help="Print the daemon's /healthz document as JSON.")] = False,
) -> None:
    """What the running daemon says of itself: broker, journal, device profile, per model the variant
    and delegate it runs on and why the others were passed over, and per function what it has cost."""
    import json
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            doc = json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 503: degraded or stalled, and its document says why
        doc = _health_document(exc)
        if doc is None:
            fail(EdgefnError(f"{url} answers HTTP {exc.code} without a health document (is this edgefn?)"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        fail(EdgefnError(f"no daemon answers on {url} ({getattr(exc, 'reason', exc)}); "
                         "start it with --metrics-port"))
    if as_json:
        print_json(doc)
    else:
        _print_health(doc)
    if doc.get("status") != "ok":
        raise typer.Exit(1)


def _health_document(error: Exception) -> dict | None:
    """The JSON document of a /healthz answer that is not 200, if it is one."""
    import json

    try:
        doc = json.loads(error.read())  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "status" in doc else None


def _print_health(doc: dict) -> None:
    table = Table(title="edgefn status", show_header=False)
    for key in ("status", "problem", "broker", "profile", "inbox_events", "outbox_messages", "held_unacknowledged"):
        if doc.get(key) is not None:
            table.add_row(key.replace("_", " "), escape(str(doc[key])))
    table.add_row("functions", escape(", ".join(f"{n} {v}" for n, v in doc.get("functions", {}).items())))
    for name, why in doc.get("failed_functions", {}).items():
        table.add_row("did not load", escape(f"{name}: {why}"))
    for key, value in _instance_rows(doc):
        table.add_row(key, escape(value))
    for key, value in _cloud_rows(doc.get("cloud")):
        table.add_row(key, escape(value))
    out.print(table)
    models = Table(title="models")
    for column in ("model", "variant", "delegate", "passed over"):
        models.add_column(column)
    for name, m in doc.get("models", {}).items():
        passed = "\n".join(f"{what}: {why}" for what, why in m.get("passed_over", []))
        models.add_row(name, m.get("variant", "?"), m.get("delegate", "?"), escape(passed) or "-")
    out.print(models)
    out.print(_usage_table(doc.get("usage") or {}))


def _usage_table(usage: dict) -> Table:
    """What each function has cost since the daemon started (the document's `usage`)."""
    from pydantic import ValidationError

    from edgefn.protocol.fleet import FunctionUsage
    from edgefn.protocol.fleet_text import USAGE_COLUMNS, usage_cells

    table = Table(title="usage since start")
    for column in ("function", *USAGE_COLUMNS):
        table.add_column(column)
    for name, fields in sorted(usage.items()):
        try:
            cells = usage_cells(FunctionUsage.model_validate(fields))
        except ValidationError:
            cells = ("?",) * len(USAGE_COLUMNS)
        table.add_row(escape(name), *cells)
    return table


def _instance_rows(doc: dict) -> list[tuple[str, str]]:
    """Each function's sandbox instances (held now, idle, its bounds) and the device's memory budget."""
    rows = [("instances", f"{name}: {p.get('instances', '?')} ({p.get('idle', '?')} idle; {p.get('min', '?')}.."
                          f"{p.get('max', '?')}, ~{p.get('instance_mb', '?')} MiB each, {p.get('cold_starts', 0)} "
                          "cold starts)")
            for name, p in doc.get("instances", {}).items()]
    if (budget := doc.get("memory_budget")) is not None:
        total = budget.get("budget_mb")
        rows.append(("memory budget", f"{budget.get('used_mb')} of {total if total is not None else 'unbounded'} "
                                      f"MiB held by instances (peak {budget.get('peak_mb')})"))
    return rows


def _cloud_rows(cloud: dict | None) -> list[tuple[str, str]]:
    """The hand-off's lines of the status table: where to, in what state, and its last error."""
    if not cloud:
        return [("cloud", "none (everything runs here)")]
    state = cloud.get("state", "?")
    if cloud.get("failing"):
        state += f" ({', '.join(cloud['failing'])})"
    breaker = cloud.get("breaker", "?") + (f" ({why})" if (why := cloud.get("breaker_reason")) else "")
    rows = [("cloud", f"{cloud.get('url', '?')}: {state}, breaker {breaker}, "
                      f"{cloud.get('handed_off', 0)} handed off, {sum(cloud.get('failures', {}).values())} failed")]
    if (error := cloud.get("last_error")) is not None:
        rows.append(("cloud last error", f"{error.get('model')} ({error.get('reason')}): {error.get('error')}"))
    return rows


def demo(
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    rate: Annotated[float, typer.Option(help="Sensor events per second.")] = 200.0,
    devices: Annotated[int, typer.Option(help="Simulated sensor devices.")] = 4,
) -> None:
    """The main job on embedded defaults: a local mosquitto, the daemon with the digits function,
    and simulated sensors publishing real handwritten-digit images; a live table shows how it goes."""
    from edgefn.demo import run_demo

    with cli_errors():
        sys.exit(run_demo(duration=duration, rate=rate, devices=devices, console=out))


def _version_table() -> Table:
    import importlib.metadata as md

    table = Table(show_header=False, box=None)
    for pkgs in (["edgefn"], ["wasmtime"], ["onnxruntime", "onnxruntime-gpu"], ["paho-mqtt"]):
        for pkg in pkgs:  # onnxruntime: the CPU build, or NVIDIA's GPU build of the same module
            try:
                table.add_row(pkg, md.version(pkg))
                break
            except md.PackageNotFoundError:
                continue
        else:
            table.add_row(pkgs[0], "not installed")
    return table


def version() -> None:
    """Show the versions of edgefn and the runtimes it uses."""
    out.print(_version_table())
