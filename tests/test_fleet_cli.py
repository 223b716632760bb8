"""`edgefn fleet rollout ...` and `edgefn fleet devices`: parsing, tables, and the commands against a real
fleet server (cloud_sync.fleet.server on loopback, a temp data dir, a bundle published with `fleet push`)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefn.cli.fleet import (
    build_request,
    devices_table,
    parse_duration,
    parse_release,
    rollout_heading,
    rollouts_table,
    waves_table,
)
from edgefn.cli.main import app
from edgefn.errors import ConfigError
from edgefn.protocol.fleet import Device, Health, Rollout, Wave, parse_gate

runner = CliRunner(env={"COLUMNS": "400", "EDGEFN_FLEET_SERVER": None, "EDGEFN_FLEET_TOKEN": None})
NOW = 1_700_000_000.0


def _text(renderable: object) -> str:
    from rich.console import Console

    console = Console(width=400, record=True, file=open("/dev/null", "w"))  # noqa: SIM115 (closed below)
    console.print(renderable)
    console.file.close()
    return console.export_text()


# ---- the pure parts ----

@pytest.mark.parametrize(("text", "seconds"), [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("45", 45.0),
                                               ("2.5", 2.5), ("250ms", 0.25), (" 10 min ", 600.0)])
def test_duration_accepts_units_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5d", "-3s", "1h30m", "s"])
def test_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(ConfigError, match="expected a duration like 30s, 5m, 1h"):
        parse_duration(text, option="--soak")


def test_release_is_name_at_pep440_version() -> None:
    assert parse_release("digits@1.4.0") == ("digits", "1.4.0")
    for bad, why in (("digits", "NAME@VERSION"), ("@1.0", "NAME@VERSION"), ("digits@", "NAME@VERSION"),
                     ("digits@one", "is not a version")):
        with pytest.raises(ConfigError, match=why):
            parse_release(bad)


def test_an_accuracy_gate_is_bounded_below() -> None:
    [rule] = build_request("digits@1.1.0", "lab", canary=1, waves="100", gate="accuracy>=0.9", soak="5s",
                           wave_timeout="2m")["gate"]
    assert rule == {"metric": "accuracy", "op": ">=", "limit": 0.9}
    assert [parse_gate("accuracy>=0.9")[0].passes(v) for v in (0.95, 0.9, 0.89, None)] == [True, True, False, True]


def test_build_request_carries_every_option() -> None:
    request = build_request("digits@1.1.0", "lab", canary=2, waves="10,50,100", gate="error_rate<0.01,p99_ms<=50",
                            soak="5s", wave_timeout="2m")
    assert request == {"bundle": "digits", "version": "1.1.0", "group": "lab", "canary": 2, "canary_devices": [],
                       "waves": [10.0, 50.0, 100.0],
                       "gate": [{"metric": "error_rate", "op": "<", "limit": 0.01},
                                {"metric": "p99_ms", "op": "<=", "limit": 50.0}],
                       "soak_s": 5.0, "wave_timeout_s": 120.0}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gate": "error_rate>0.01"}, "--gate: gate rule 'error_rate>0.01': error_rate is bounded above"),
    ({"gate": "accuracy<0.9"}, "--gate: gate rule 'accuracy<0.9': accuracy is bounded below: accuracy>=VALUE"),
    ({"gate": "error_rate=0.01"}, "expected METRIC<VALUE or METRIC>=VALUE"),
    ({"gate": "latency<5"}, "unknown metric 'latency'"),
    ({"waves": "50,10,100"}, "waves are rising percentages"),
    ({"waves": "10,50"}, "waves are rising percentages"),
    ({"waves": "ten"}, "--waves 'ten'"),
    ({"soak": "forever"}, "--soak 'forever'"),
    ({"wave_timeout": "0"}, "wave_timeout_s"),
])
def test_build_request_refuses_bad_options_clearly(kwargs: dict, message: str) -> None:
    options = {"canary": 1, "waves": "100", "gate": "", "soak": "30s", "wave_timeout": "10m"} | kwargs
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_request("digits@1.0.0", "lab", **options)


def _rollout(**update: object) -> Rollout:
    rollout = Rollout(id=3, bundle="digits", version="1.1.0", group="lab", state="running", current_wave=1,
                      waves=[Wave(name="canary", devices=["a"], state="passed", healthy=1,
                                  gate_values={"error_rate": 0.0, "p99_ms": None}),
                             Wave(name="wave 1", devices=["a", "b", "c"], state="soaking", healthy=2)],
                      gate=parse_gate("error_rate<0.01"), soak_s=30, created=NOW, updated=NOW)
    return rollout.model_copy(update=update)


def test_tables_show_progress_gate_values_and_reasons() -> None:
    assert rollout_heading(_rollout()) == "rollout 3: digits@1.1.0 to lab, running; gate error_rate<0.01, soak 30 s"
    waves = _text(waves_table(_rollout()))
    assert "error_rate=0, p99_ms=n/a" in waves and "> wave 1" in waves and "2/3" in waves
    halted = _rollout(id=4, state="halted", rolled_back=True, reason="canary: [gate] error_rate broken")
    listed = _text(rollouts_table([halted, _rollout()]))
    assert listed.index("digits@1.1.0") < listed.index("halted (rolled back)")  # sorted by id
    assert "wave 1 (2/2): soaking 2/3 healthy" in listed
    assert "canary: [gate] error_rate broken" in listed  # brackets are text, not rich markup
    device = Device(id="a-001", group="lab", state="active", bundle="digits", version="1.0.0",
                    desired_version="1.1.0", health=Health(events=10, errors=1, p99_ms=7.25), last_seen=NOW - 4)
    shown = _text(devices_table([device], now=NOW))
    assert "a-001" in shown and "digits@1.0.0 -> 1.1.0" in shown and "7.2" in shown and "4 s ago" in shown


def test_server_down_is_one_line_and_exit_1() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listened
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        for args in (["fleet", "devices"], ["fleet", "rollout", "list", "--json"], ["fleet", "rollout", "status", "1"]):
            result = runner.invoke(app, [*args, "--server", url])
            assert result.exit_code == 2, result.output
            assert f"error: cannot reach the fleet server at {url}" in result.output
            assert "Traceback" not in result.output


def test_bad_options_fail_before_any_request() -> None:
    # Port 9 (discard) is never contacted: the options are checked first.
    base = ["fleet", "rollout", "create", "--bundle", "digits@1.0.0", "--group", "lab", "--server",
            "http://127.0.0.1:9"]
    for extra, message in ((["--gate", "p99<5"], "unknown metric 'p99'"), (["--soak", "5 days"], "--soak '5 days'"),
                           (["--waves", "10,50"], "waves are rising percentages")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, result.output


def test_server_url_comes_from_the_environment() -> None:
    result = runner.invoke(app, ["fleet", "devices"], env={"EDGEFN_FLEET_SERVER": "http://127.0.0.1:9"})
    assert result.exit_code == 2 and "cannot reach the fleet server at http://127.0.0.1:9" in result.output
    result = runner.invoke(app, ["fleet", "devices"])
    assert result.exit_code == 2 and "--server" in result.output  # a usage error: nothing names a server


def test_token_env_must_be_set_when_named() -> None:
    result = runner.invoke(app, ["fleet", "devices", "--server", "http://127.0.0.1:9", "--token-env", "NO_SUCH_TOKEN"])
    assert result.exit_code == 2 and "--token-env names NO_SUCH_TOKEN" in result.output



# ---- against a real fleet server ----

def _report(url: str, device_id: str, group: str, state: str = "idle", **extra: object) -> None:
    import httpx

    from edgefn.protocol.fleet import API, DeviceReport

    report = DeviceReport(group=group, state=state, **extra)
    response = httpx.post(f"{url}{API}/devices/{device_id}/report", json=report.model_dump(mode="json"), timeout=10)
    assert response.status_code == 200, response.text


@pytest.fixture()
def ops(tmp_path: Path) -> Path:
    """The operator's repository, made with the real `edgefn fleet keys init`."""
    result = runner.invoke(app, ["fleet", "keys", "init", str(tmp_path / "ops")])
    assert result.exit_code == 0, result.output
    return tmp_path / "ops"


@pytest.fixture()
def fleet(tmp_path: Path, ops: Path):
    from cloud_sync.fleet.server import start_fleet_server

    # step_s=0: the engine moves only when a test calls step(), so what each command sees is decided here.
    with start_fleet_server(tmp_path / "data", step_s=0, insecure=True,
                            fleet_root=ops / "repository" / "metadata" / "1.root.json") as server:
        yield server


@pytest.fixture()
def published(tiny_fn: Path, fleet, ops: Path, tmp_path: Path) -> str:
    """A bundle built with `edgefn bundle build` and released with `edgefn fleet push`: digits@1.1.0."""
    bundle = tmp_path / "digits-1.1.0.bundle.tar"  # tiny_fn: the server handles bytes, not a working guest
    result = runner.invoke(app, ["bundle", "build", str(tiny_fn), "--name", "digits", "--version", "1.1.0",
                                 "--models", str(tmp_path / "no-models"), "-o", str(bundle)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["fleet", "push", str(bundle), "--keys", str(ops), "--server", fleet.url])
    assert result.exit_code == 0, result.output
    return "digits@1.1.0"


def test_push_reads_the_server_from_the_environment(published: str, fleet, ops: Path) -> None:
    result = runner.invoke(app, ["fleet", "push", "--refresh", "--keys", str(ops)],
                           env={"EDGEFN_FLEET_SERVER": fleet.url})
    assert result.exit_code == 0, result.output
    assert f"uploaded to {fleet.url}: " in result.output and "timestamp.json" in result.output


def test_devices_empty_then_after_reports(fleet) -> None:
    result = runner.invoke(app, ["fleet", "devices", "--server", fleet.url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"devices": []}
    assert "0 device(s)" in runner.invoke(app, ["fleet", "devices", "--server", fleet.url]).output
    for device_id, group in (("a-001", "lab"), ("a-002", "lab"), ("b-001", "yard")):
        _report(fleet.url, device_id, group, health=Health(events=50, errors=2, p99_ms=9.5))
    result = runner.invoke(app, ["fleet", "devices", "--server", fleet.url, "--json"])
    devices = json.loads(result.output)["devices"]
    assert sorted(d["id"] for d in devices) == ["a-001", "a-002", "b-001"]
    assert {d["state"] for d in devices} == {"idle"}
    result = runner.invoke(app, ["fleet", "devices", "--group", "lab"], env={"EDGEFN_FLEET_SERVER": fleet.url})
    assert result.exit_code == 0, result.output
    assert "2 device(s)" in result.output and "a-002" in result.output and "b-001" not in result.output
    assert "9.5" in result.output and "s ago" in result.output


def test_rollout_create_of_an_unknown_bundle_says_so(fleet) -> None:
    _report(fleet.url, "a-001", "lab")
    result = runner.invoke(app, ["fleet", "rollout", "create", "--bundle", "nope@1.0.0", "--group", "lab",
                                 "--server", fleet.url])
    assert result.exit_code == 2, result.output
    assert "HTTP 404" in result.output and "no bundle nope 1.0.0 was published" in result.output
    assert "Traceback" not in result.output


def test_rollout_create_for_an_empty_group_and_unknown_rollout(fleet, published: str) -> None:
    result = runner.invoke(app, ["fleet", "rollout", "create", "--bundle", published, "--group", "nobody",
                                 "--server", fleet.url])
    assert result.exit_code == 2 and "HTTP 400" in result.output and "has no devices" in result.output
    for args in (["status", "999"], ["pause", "999"], ["abort", "999", "--json"]):
        result = runner.invoke(app, ["fleet", "rollout", *args, "--server", fleet.url])
        assert result.exit_code == 2 and "HTTP 404" in result.output, result.output


def test_rollout_create_status_list_pause_resume_abort(fleet, published: str) -> None:
    for i in range(1, 6):
        _report(fleet.url, f"a-00{i}", "lab")
    server = ["--server", fleet.url]
    result = runner.invoke(app, ["fleet", "rollout", "create", "--bundle", published, "--group", "lab",
                                 "--canary", "1", "--waves", "40,100", "--gate", "error_rate<0.01,p99_ms<50",
                                 "--soak", "1m", "--wave-timeout", "10m", "--json", *server])
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    rollout_id = created["id"]
    assert (created["bundle"], created["version"], created["group"], created["state"]) == (
        "digits", "1.1.0", "lab", "running")
    assert [w["devices"] for w in created["waves"]] == [["a-001"], ["a-002"], ["a-003", "a-004", "a-005"]]
    assert created["soak_s"] == 60.0 and created["gate"] == [r.model_dump() for r in parse_gate(
        "error_rate<0.01,p99_ms<50")]

    fleet.engine.step()  # the canary starts: a-001 is told to install
    result = runner.invoke(app, ["fleet", "rollout", "status", str(rollout_id), *server])
    assert result.exit_code == 0, result.output
    assert f"rollout {rollout_id}: digits@1.1.0 to lab, running" in result.output
    assert "canary (1/3): installing 0/1 healthy" in result.output
    status = json.loads(runner.invoke(app, ["fleet", "rollout", "status", str(rollout_id), "--json", *server]).output)
    assert status["waves"][0]["state"] == "installing"

    result = runner.invoke(app, ["fleet", "rollout", "pause", str(rollout_id), *server])
    assert result.exit_code == 0 and f"rollout {rollout_id}: paused" in result.output, result.output
    result = runner.invoke(app, ["fleet", "rollout", "resume", str(rollout_id), "--json", *server])
    assert result.exit_code == 0 and json.loads(result.output)["state"] == "running", result.output
    result = runner.invoke(app, ["fleet", "rollout", "resume", str(rollout_id), *server])
    assert result.exit_code == 2 and "HTTP 409" in result.output and "cannot resume" in result.output

    listed = runner.invoke(app, ["fleet", "rollout", "list", *server])
    assert listed.exit_code == 0 and "1 rollout(s)" in listed.output and "digits@1.1.0" in listed.output
    listed = runner.invoke(app, ["fleet", "rollout", "list", "--json", *server])
    assert [r["id"] for r in json.loads(listed.output)["rollouts"]] == [rollout_id]

    result = runner.invoke(app, ["fleet", "rollout", "abort", str(rollout_id), *server])
    assert result.exit_code == 0 and f"rollout {rollout_id}: aborted (aborted)" in result.output, result.output
    result = runner.invoke(app, ["fleet", "rollout", "status", str(rollout_id), *server])
    assert "reason: aborted (rolled back)" in result.output
    # A second rollout may start once the first is over; without --json only its id is printed.
    result = runner.invoke(app, ["fleet", "rollout", "create", "--bundle", published, "--group", "lab", *server])
    assert result.exit_code == 0 and result.output.strip() == str(rollout_id + 1), result.output


def test_rollout_changes_need_the_token_when_the_server_has_one(tmp_path: Path, ops: Path) -> None:
    from cloud_sync.fleet.server import start_fleet_server

    with start_fleet_server(tmp_path / "data", step_s=0, token="s3cret",
                            fleet_root=ops / "repository" / "metadata" / "1.root.json") as server:
        create = ["fleet", "rollout", "create", "--bundle", "nope@1.0.0", "--group", "lab", "--server", server.url]
        result = runner.invoke(app, create)
        assert result.exit_code == 2 and "HTTP 401" in result.output and "bearer token" in result.output
        result = runner.invoke(app, [*create, "--token-env", "OPS_TOKEN"], env={"OPS_TOKEN": "s3cret"})
        assert result.exit_code == 2 and "HTTP 404" in result.output, result.output  # past the token check
        result = runner.invoke(app, create, env={"EDGEFN_FLEET_TOKEN": "wrong"})
        assert result.exit_code == 2 and "HTTP 401" in result.output
