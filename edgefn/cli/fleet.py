"""`edgefn fleet ...`: the operator's side of fleet rollout.

`fleet keys init` makes the TUF keys and the operator's token, `fleet push` signs a bundle and uploads
it, `fleet rollout create|status|list|pause|resume|abort` drives a rollout, `fleet devices` lists what
devices report, `fleet devices enroll|revoke|remove` gives a device its credential, takes it back or
forgets the device, `fleet usage` shows what each function costs each device, `fleet audit` who did what.
Every command that talks to the server takes --server (or EDGEFN_FLEET_SERVER) and --token-env.

Every failure (the server down, a rollout it does not know, a request it refuses) is one line on
stderr and exit code 2; `--json` prints the protocol's models as JSON for scripts.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgefn.cli._toolkit import (
    SERVER_ENV,
    ServerOpt,
    TimeoutOpt,
    TokenEnvOpt,
    call_fleet,
    cli_errors,
    out,
    print_json,
    token_from_env,
)
from edgefn.errors import ConfigError, FleetError, validation_text

if TYPE_CHECKING:
    from edgefn.protocol.fleet import AuditEntry, Device, Rollout

fleet_app = typer.Typer(help="Roll functions and models out to a fleet: keys, push, rollouts, devices.",
                        no_args_is_help=True)
keys_app = typer.Typer(help="The TUF signing keys of a fleet's releases.", no_args_is_help=True)
rollout_app = typer.Typer(help="Canary, waves and health gates: create, watch, pause, resume, abort.",
                          no_args_is_help=True)
devices_app = typer.Typer(help="The fleet's devices: list them (the default), enroll one, revoke one, remove one.")
fleet_app.add_typer(keys_app, name="keys")
fleet_app.add_typer(rollout_app, name="rollout")
fleet_app.add_typer(devices_app, name="devices")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON instead of a table.")]
UNPUBLISHED = "unpublished.json"  # in the keys folder: metadata signed here that the server has not taken yet
RolloutId = Annotated[int, typer.Argument(metavar="ID", help="The rollout's id (from `rollout create` or `list`).")]


# ---- parsing what the operator types ----

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|min|h)?\s*$")
_UNIT_S = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str, *, option: str = "duration") -> float:
    """'30s', '5m', '1h', '250ms' or plain seconds ('45', '2.5') -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"{option} {text!r}: expected a duration like 30s, 5m, 1h or plain seconds")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_release(text: str) -> tuple[str, str]:
    """'digits@1.4.0' -> ('digits', '1.4.0'), the version checked as PEP 440."""
    from edgefn.protocol.fleet import parse_version

    name, at, version = text.partition("@")
    if not at or not name.strip() or not version.strip():
        raise ConfigError(f"--bundle {text!r}: expected NAME@VERSION, e.g. digits@1.4.0")
    try:
        parse_version(version.strip())
    except ValueError as exc:
        raise ConfigError(f"--bundle {text!r}: {exc}") from None
    return name.strip(), version.strip()


def parse_waves(text: str) -> list[float]:
    """'10,50,100' -> [10.0, 50.0, 100.0]: cumulative percentages of the group."""
    try:
        return [float(w.strip().rstrip("%")) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--waves {text!r}: expected rising percentages like 10,50,100") from None


def build_request(release: str, group: str, *, canary: int, waves: str, gate: str, soak: str,
                  wave_timeout: str, canary_devices: list[str] | None = None) -> dict[str, Any]:
    """The RolloutRequest the options describe, checked here so a typo fails before the server sees it."""
    from pydantic import ValidationError

    from edgefn.protocol.fleet import RolloutRequest, parse_gate

    bundle, version = parse_release(release)
    try:
        rules = parse_gate(gate)
    except ValueError as exc:
        raise ConfigError(f"--gate: {exc}") from None
    try:
        request = RolloutRequest(bundle=bundle, version=version, group=group, canary=canary,
                                 canary_devices=canary_devices or [], waves=parse_waves(waves), gate=rules,
                                 soak_s=parse_duration(soak, option="--soak"),
                                 wave_timeout_s=parse_duration(wave_timeout, option="--wave-timeout"))
    except ValidationError as exc:
        raise ConfigError(f"invalid rollout: {validation_text(exc, {'value_error': '{error}'})}") from None
    return request.model_dump(mode="json")


# ---- talking to the server ----

def _model(kind: type, doc: Any, url_hint: str) -> Any:
    from pydantic import ValidationError

    try:
        return kind.model_validate(doc)
    except ValidationError as exc:
        raise FleetError(f"{url_hint}: unexpected answer from the fleet server: {validation_text(exc)}") from None


def _rollout(method: str, server: str, path: str, token_env: str | None, timeout: float,
             body: dict | None = None) -> Rollout:
    """A call whose answer is one rollout."""
    from edgefn.protocol.fleet import Rollout

    doc = call_fleet(method, server, path, token=token_from_env(token_env), body=body, timeout=timeout)
    return _model(Rollout, doc, "rollout")


def _listed(server: str, path: str, key: str, kind: type, token_env: str | None, timeout: float) -> list:
    """A GET whose answer is {key: [kind...]}."""
    doc = call_fleet("GET", server, path, token=token_from_env(token_env), timeout=timeout)
    items = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise FleetError(f"unexpected answer from the fleet server: no {key!r} list")
    return [_model(kind, item, key) for item in items]


# ---- tables ----

def devices_table(devices: list[Device], *, now: float) -> Table:
    from edgefn.protocol.fleet_text import ago

    table = Table(box=box.SIMPLE_HEAD, title=f"{len(devices)} device(s)")
    for header in ("device", "group", "version", "state", "events", "errors", "p99 ms", "last seen", "detail"):
        table.add_column(header)
    for d in sorted(devices, key=lambda d: (d.group, d.id)):
        version = f"{d.bundle}@{d.version}" if d.bundle and d.version else "-"
        if d.desired_version and d.desired_version != d.version:
            version += f" -> {d.desired_version}"
        p99 = "-" if d.health.p99_ms is None else f"{d.health.p99_ms:.1f}"
        table.add_row(*(escape(c) for c in (d.id, d.group, version, d.state, str(d.health.events),
                                            str(d.health.errors), p99, ago(now - d.last_seen), d.detail)))
    return table


def usage_table(devices: list[Device]) -> Table:
    """What each function has cost each device since its daemon started (the devices' bills)."""
    from edgefn.protocol.fleet_text import USAGE_COLUMNS, usage_cells

    table = Table(box=box.SIMPLE_HEAD, title="usage per device and function")
    for header in ("device", "function", *USAGE_COLUMNS):
        table.add_column(header)
    for d in sorted(devices, key=lambda d: (d.group, d.id)):
        for name, u in sorted(d.usage.items()):
            table.add_row(*(escape(c) for c in (d.id, name, *usage_cells(u))))
    return table


def audit_table(entries: list[AuditEntry]) -> Table:
    from edgefn.protocol.fleet_text import audit_arguments_text

    table = Table(box=box.SIMPLE_HEAD, title=f"{len(entries)} audit entr{'y' if len(entries) == 1 else 'ies'}")
    for header in ("id", "when (UTC)", "who", "what", "arguments", "status", "result"):
        table.add_column(header)
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at))
        table.add_row(*(escape(c) for c in (str(e.id), when, e.who, e.action, audit_arguments_text(e),
                                            str(e.status), e.result)))
    return table


def rollouts_table(rollouts: list[Rollout]) -> Table:
    from edgefn.protocol.fleet_text import wave_line

    table = Table(box=box.SIMPLE_HEAD, title=f"{len(rollouts)} rollout(s)")
    for header in ("id", "release", "group", "state", "progress", "reason"):
        table.add_column(header)
    for r in sorted(rollouts, key=lambda r: r.id):
        state = r.state + (" (rolled back)" if r.rolled_back else "")
        table.add_row(*(escape(c) for c in (str(r.id), f"{r.bundle}@{r.version}", r.group, state,
                                            wave_line(r), r.reason)))
    return table


def rollout_heading(rollout: Rollout) -> str:
    """'rollout 3: digits@1.1.0 to lab, running; gate error_rate<0.01, soak 30 s' (plain text)."""
    gate = ", ".join(str(rule) for rule in rollout.gate) or "none"
    return (f"rollout {rollout.id}: {rollout.bundle}@{rollout.version} to {rollout.group}, {rollout.state}; "
            f"gate {gate}, soak {rollout.soak_s:g} s")


def waves_table(rollout: Rollout) -> Table:
    from edgefn.protocol.fleet_text import gate_values_text

    table = Table(box=box.SIMPLE_HEAD)
    for header in ("wave", "devices", "state", "healthy", "gate values"):
        table.add_column(header)
    for i, w in enumerate(rollout.waves):
        values = gate_values_text(w)
        marker = "> " if i == rollout.current_wave and rollout.state in ("running", "paused") else "  "
        table.add_row(escape(marker + w.name), str(len(w.devices)), w.state, f"{w.healthy}/{len(w.devices)}",
                      escape(values or "-"))
    return table


def _show_rollout(rollout: Rollout) -> None:
    from edgefn.protocol.fleet_text import wave_line

    out.print(escape(rollout_heading(rollout)), highlight=False)
    out.print(waves_table(rollout))
    out.print(escape(wave_line(rollout)), highlight=False)
    if rollout.reason:
        out.print(f"reason: {escape(rollout.reason)}" + (" (rolled back)" if rollout.rolled_back else ""),
                  highlight=False)


# ---- commands: keys and releases ----

@keys_app.command("init")
def keys_init(
    repo_dir: Annotated[Path, typer.Argument(metavar="DIR", help="The operator's repository folder: keys/ and "
                                                                 "repository/ go in it.")],
    force: Annotated[bool, typer.Option(help="Replace existing keys and metadata (devices given the old root "
                                             "will refuse every new release).")] = False,
) -> None:
    """Make the Ed25519 keys of root, targets, snapshot and timestamp, the first (root) metadata, and the
    operator's token.

    Keep DIR/keys private. Give the fleet server DIR/repository/metadata/1.root.json (--fleet-root) and
    DIR/operator.token (--token-file); give every device the same root once (its --fleet-root).
    """
    from edgefn.fleet.signing import ROLES, init_keys, init_operator_token, keys_dir

    with cli_errors():
        root = init_keys(repo_dir, force=force)
        token = init_operator_token(repo_dir, force=force)
    for role in ROLES:
        out.print(f"{role:9} key  {escape(str(keys_dir(repo_dir) / f'{role}.pem'))} (0600)", highlight=False)
    out.print(f"root metadata  [bold]{escape(str(root))}[/]: give it to the fleet server and to each device once "
              "(--fleet-root FILE)", highlight=False)
    out.print(f"operator token [bold]{escape(str(token))}[/] (0600): the fleet server's --token-file; "
              "export EDGEFN_FLEET_TOKEN=$(cat FILE) for these commands", highlight=False)


def _pending(keys: Path) -> list[str]:
    try:
        return list(json.loads((keys / UNPUBLISHED).read_text())["files"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FleetError(f"{keys / UNPUBLISHED}: unreadable ({exc}); delete it to push only the new metadata") from None


def _upload_order(name: str) -> tuple[int, int]:
    """root, targets, snapshot (each by version), then timestamp: the order a verifier needs them in."""
    version, _, role = name.partition(".")
    rank = {"root.json": 0, "targets.json": 1, "snapshot.json": 2}.get(role, 3)
    return (rank, int(version)) if version.isdigit() else (3, 0)


def _upload(server: str, bundle: Path | None, metadata: list[Path], token: str | None, timeout: float) -> dict:
    """Publish: the bundle (None: metadata alone) and its signed metadata, in one multipart POST."""
    with contextlib.ExitStack() as stack:
        files: list[tuple[str, tuple[str, object, str]]] = []
        if bundle is not None:
            files.append(("bundle", (bundle.name, stack.enter_context(open(bundle, "rb")), "application/x-tar")))
        files += [("metadata", (p.name, p.read_bytes(), "application/json")) for p in metadata]
        answer = call_fleet("POST", server, "/publish", token=token, files=files, timeout=timeout)
    return answer if isinstance(answer, dict) else {}


@fleet_app.command("push")
def push(
    keys: Annotated[Path, typer.Option(help="The operator's repository folder (`edgefn fleet keys init`).")],
    server: ServerOpt,
    file: Annotated[Path | None, typer.Argument(metavar="FILE", help="The bundle to release (from `edgefn bundle build`); none "
                                                     "with --refresh.")] = None,
    expires_days: Annotated[float, typer.Option(min=0.001, help="Days until the new timestamp expires (devices "
                                                                 "refuse an expired one; re-sign with --refresh).")] = 7.0,
    refresh: Annotated[bool, typer.Option(help="Only re-sign the timestamp (a new expiry) and upload it.")] = False,
    token_env: TokenEnvOpt = None,
    timeout: TimeoutOpt = 120.0,
) -> None:
    """Sign a bundle into the repository (targets, snapshot, timestamp) and upload it with the new metadata.

    The repository in --keys keeps every signed version. Metadata the server did not take (it was down)
    is sent again with the next push.
    """
    from edgefn.config import redact_url
    from edgefn.files import file_sha256
    from edgefn.fleet.signing import add_release, keys_dir, metadata_dir, refresh_timestamp
    from edgefn.fleet.unpack import read_bundle

    with cli_errors():
        if refresh and file is not None:
            raise ConfigError("--refresh re-signs the timestamp alone: give no bundle FILE")
        if not refresh and file is None:
            raise ConfigError("give the bundle FILE to push (or --refresh to re-sign the timestamp)")
        token = token_from_env(token_env)
        pending = _pending(keys_dir(keys))
        if refresh:
            new = refresh_timestamp(keys, expires_days=expires_days)
        else:
            assert file is not None
            bundle = read_bundle(file)
            new = add_release(keys, file, expires_days=expires_days)
        names = sorted({*pending, *(p.name for p in new)}, key=_upload_order)
        (keys_dir(keys) / UNPUBLISHED).write_text(json.dumps({"files": names}) + "\n")
        metadata = [metadata_dir(keys) / n for n in names]
        if refresh:
            out.print(f"signed timestamp (expires in {expires_days:g} days)", highlight=False)
        else:
            out.print(f"signed [bold]{escape(bundle.target)}[/] (sha256 {file_sha256(file)})", highlight=False)
        _upload(server, file, metadata, token, timeout)
        (keys_dir(keys) / UNPUBLISHED).unlink()
    out.print(f"uploaded to {escape(redact_url(server))}: {escape(', '.join(names))}"
              + (f" and {escape(file.name)}" if file is not None else ""), highlight=False)


# ---- commands: rollouts and devices ----

@rollout_app.command("create")
def rollout_create(
    bundle: Annotated[str, typer.Option(metavar="NAME@VERSION", help="The published release to roll out, "
                                                                      "e.g. digits@1.4.0.")],
    group: Annotated[str, typer.Option(help="The device group to roll it out to.")],
    server: ServerOpt,
    canary: Annotated[int, typer.Option(min=0, help="Devices in the canary, the first wave (0: none).")] = 1,
    waves: Annotated[str, typer.Option(help="Cumulative percentages of the group per wave after the canary, "
                                            "ending at 100.")] = "100",
    gate: Annotated[str, typer.Option(help="Health gate every wave must hold over its soak, e.g. "
                                           "'error_rate<0.01,p99_ms<50,install_failures<1'.")] = "",
    soak: Annotated[str, typer.Option(help="How long each wave runs healthy before the next (30s, 5m, 1h or "
                                           "seconds).")] = "30s",
    wave_timeout: Annotated[str, typer.Option(help="A wave not healthy by then halts the rollout (30s, 5m, 1h "
                                                   "or seconds).")] = "10m",
    canary_device: Annotated[list[str] | None, typer.Option(help="A device of the group to be the canary "
                                                                 "(repeatable; instead of --canary N, which takes "
                                                                 "the first N by id).")] = None,
    token_env: TokenEnvOpt = None,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Start a rollout: the canary first, then each wave, each soaked and gated; prints its id."""
    with cli_errors():
        request = build_request(bundle, group, canary=canary, waves=waves, gate=gate, soak=soak,
                                wave_timeout=wave_timeout, canary_devices=canary_device)
        rollout = _rollout("POST", server, "/rollouts", token_env, timeout, body=request)
    if as_json:
        print_json(rollout.model_dump(mode="json"))
    else:
        typer.echo(rollout.id)


@rollout_app.command("status")
def rollout_status(rollout_id: RolloutId, server: ServerOpt, token_env: TokenEnvOpt = None, as_json: JsonOpt = False,
                   timeout: TimeoutOpt = 30.0) -> None:
    """One rollout: each wave's devices, state, healthy count and recorded gate values."""
    with cli_errors():
        rollout = _rollout("GET", server, f"/rollouts/{rollout_id}", token_env, timeout)
    if as_json:
        print_json(rollout.model_dump(mode="json"))
    else:
        _show_rollout(rollout)


@rollout_app.command("list")
def rollout_list(server: ServerOpt, token_env: TokenEnvOpt = None, as_json: JsonOpt = False,
                 timeout: TimeoutOpt = 30.0) -> None:
    """Every rollout the server knows, oldest first."""
    from edgefn.protocol.fleet import Rollout

    with cli_errors():
        rollouts = _listed(server, "/rollouts", "rollouts", Rollout, token_env, timeout)
    if as_json:
        print_json({"rollouts": [r.model_dump(mode="json") for r in rollouts]})
    else:
        out.print(rollouts_table(rollouts))


def _act(action: str, rollout_id: int, server: str, token_env: str | None, as_json: bool, timeout: float) -> None:
    with cli_errors():
        rollout = _rollout("POST", server, f"/rollouts/{rollout_id}/{action}", token_env, timeout)
    if as_json:
        print_json(rollout.model_dump(mode="json"))
    else:
        typer.echo(f"rollout {rollout.id}: {rollout.state}" + (f" ({rollout.reason})" if rollout.reason else ""))


@rollout_app.command("pause")
def rollout_pause(rollout_id: RolloutId, server: ServerOpt, token_env: TokenEnvOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 30.0) -> None:
    """Start no further wave; devices already updated keep the new release."""
    _act("pause", rollout_id, server, token_env, as_json, timeout)


@rollout_app.command("resume")
def rollout_resume(rollout_id: RolloutId, server: ServerOpt, token_env: TokenEnvOpt = None, as_json: JsonOpt = False,
                   timeout: TimeoutOpt = 30.0) -> None:
    """Go on with a paused rollout."""
    _act("resume", rollout_id, server, token_env, as_json, timeout)


@rollout_app.command("abort")
def rollout_abort(rollout_id: RolloutId, server: ServerOpt, token_env: TokenEnvOpt = None, as_json: JsonOpt = False,
                  timeout: TimeoutOpt = 30.0) -> None:
    """Halt the rollout and give every device of it its previous release back."""
    _act("abort", rollout_id, server, token_env, as_json, timeout)


@devices_app.callback(invoke_without_command=True)
def devices(ctx: typer.Context,
            server: Annotated[str | None, typer.Option(envvar=SERVER_ENV, show_envvar=True,
                                                       help="The fleet server, e.g. http://HOST:8080.")] = None,
            group: Annotated[str | None, typer.Option(help="Only the devices of this group.")] = None,
            token_env: TokenEnvOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 30.0) -> None:
    """The devices that reported to the server: group, release, update state, health, last seen."""
    from edgefn.protocol.fleet import Device

    if ctx.invoked_subcommand is not None:
        return
    if server is None:
        raise typer.BadParameter("missing --server (or EDGEFN_FLEET_SERVER)", param_hint="--server")
    with cli_errors():
        found = _listed(server, "/devices", "devices", Device, token_env, timeout)
    if group is not None:
        found = [d for d in found if d.group == group]
    if as_json:
        print_json({"devices": [d.model_dump(mode="json") for d in found]})
    else:
        out.print(devices_table(found, now=time.time()))


@devices_app.command("enroll")
def devices_enroll(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id (its --device-id).")],
    group: Annotated[str, typer.Option(help="The group the device belongs to.")],
    server: ServerOpt,
    token_out: Annotated[Path | None, typer.Option(help="Write the device's token to this file (0600) instead of "
                                                        "printing it.")] = None,
    token_env: TokenEnvOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 30.0) -> None:
    """Enroll a device in a group and print its credential (once: the server keeps only its hash).

    The device gives it with `edgefn run --device-token-file FILE` (or EDGEFN_DEVICE_TOKEN). Enrolling an
    enrolled device again issues a new token; the old one stops working.
    """
    from edgefn.files import write_atomic
    from edgefn.protocol.fleet import Enrollment

    with cli_errors():
        doc = call_fleet("POST", server, "/enrollments", token=token_from_env(token_env),
                         body={"device_id": device_id, "group": group}, timeout=timeout)
        enrollment = _model(Enrollment, doc, "enrollment")
        if token_out is not None:
            write_atomic(token_out, (enrollment.token + "\n").encode())  # mkstemp: 0600
    if as_json:
        print_json(enrollment.model_dump(mode="json") if token_out is None else
                   {"device_id": enrollment.device_id, "group": enrollment.group, "token_file": str(token_out)})
    elif token_out is not None:
        typer.echo(f"device {enrollment.device_id} enrolled in {enrollment.group}; its token is in {token_out}")
    else:
        typer.echo(enrollment.token)


@devices_app.command("revoke")
def devices_revoke(device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id.")],
                   server: ServerOpt, token_env: TokenEnvOpt = None, timeout: TimeoutOpt = 30.0) -> None:
    """Take a device's credential back: its reports are refused, and new rollouts leave it out."""
    with cli_errors():
        call_fleet("POST", server, f"/enrollments/{device_id}/revoke", token=token_from_env(token_env),
                   timeout=timeout)
    typer.echo(f"device {device_id}: revoked")


@devices_app.command("remove")
def devices_remove(device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id.")],
                   server: ServerOpt, token_env: TokenEnvOpt = None, timeout: TimeoutOpt = 30.0) -> None:
    """Forget a device: its state, its place in rollouts to come and its credential (enroll it again to bring
    it back)."""
    with cli_errors():
        call_fleet("DELETE", server, f"/devices/{device_id}", token=token_from_env(token_env), timeout=timeout)
    typer.echo(f"device {device_id}: removed")


@fleet_app.command("usage")
def usage(server: ServerOpt, group: Annotated[str | None, typer.Option(help="Only the devices of this group.")] = None,
          token_env: TokenEnvOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 30.0) -> None:
    """What each function costs each device, as the devices last reported it: invocations, guest CPU, peak
    memory, inference here and on the cloud, bytes in and out."""
    from edgefn.protocol.fleet import Device

    with cli_errors():
        found = [d for d in _listed(server, "/devices", "devices", Device, token_env, timeout)
                 if group is None or d.group == group]
    if as_json:
        print_json({"usage": {d.id: {n: u.model_dump(mode="json") for n, u in d.usage.items()} for d in found}})
    else:
        out.print(usage_table(found))


@fleet_app.command("audit")
def audit(server: ServerOpt,
          limit: Annotated[int, typer.Option(min=1, max=10_000, help="The newest this many entries.")] = 100,
          token_env: TokenEnvOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = 30.0) -> None:
    """The fleet server's audit trail, oldest first: who published, enrolled, removed or changed a rollout,
    when, with what arguments, and what came of it (refusals included)."""
    from edgefn.protocol.fleet import AuditEntry

    with cli_errors():
        entries = _listed(server, f"/audit?limit={limit}", "entries", AuditEntry, token_env, timeout)
    if as_json:
        print_json({"entries": [e.model_dump(mode="json") for e in entries]})
    else:
        out.print(audit_table(entries))
