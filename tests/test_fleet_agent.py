"""The device agent (edgefn.fleet.agent) against the real fleet server: a real daemon updated while
events stream, health checks and gates that roll a device back, a downgrade refused, and a SIGKILL at
every step of an update. Real broker, real components, real bundles signed and verified with TUF."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from cloud_sync.fleet.server import FleetServer, start_fleet_server
from edgefn.childproc import stop_gracefully
from edgefn.cli.main import app
from edgefn.daemon import Daemon
from edgefn.fleet.pack import build_bundle
from edgefn.fleet.signing import init_keys
from edgefn.fleet.store import FleetStore
from edgefn.mqtt.local_broker import LocalBroker
from edgefn.protocol.fleet import API, UPDATE_STEPS, Device, Rollout, RolloutRequest, parse_gate
from tests.conftest import MODELS, publish

runner = CliRunner()
ROOT_FILE = "repository/metadata/1.root.json"
OPERATOR = {"Authorization": "Bearer ops-s3cret"}  # the fleet server here is closed, as the README starts it


@dataclass
class Fleet:
    server: FleetServer
    ops: Path  # the operator's keys and repository

    @property
    def root(self) -> Path:
        return self.ops / ROOT_FILE

    def enroll(self, device_id: str, group: str) -> str:
        """The device's credential, as `edgefn fleet devices enroll` gets it."""
        response = httpx.post(f"{self.server.url}{API}/enrollments", json={"device_id": device_id, "group": group},
                              headers=OPERATOR, timeout=10)
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def rollout(self, version: str, group: str, gate: str = "", soak_s: float = 0.3) -> Rollout:
        request = RolloutRequest(bundle="digits", version=version, group=group, canary=1, waves=[100],
                                 gate=parse_gate(gate) if gate else [], soak_s=soak_s, wave_timeout_s=120)
        response = httpx.post(f"{self.server.url}{API}/rollouts", content=request.model_dump_json(),
                              headers={"Content-Type": "application/json", **OPERATOR}, timeout=10)
        assert response.status_code == 201, response.text
        return Rollout.model_validate_json(response.content)

    def get_rollout(self, rollout_id: int) -> Rollout:
        return Rollout.model_validate_json(httpx.get(f"{self.server.url}{API}/rollouts/{rollout_id}", timeout=10).content)

    def device(self, device_id: str) -> Device | None:
        devices = httpx.get(f"{self.server.url}{API}/devices", timeout=10).json()["devices"]
        found = [Device.model_validate(d) for d in devices if d["id"] == device_id]
        return found[0] if found else None

    def wait_device(self, device_id: str, timeout: float = 60.0, **wanted: object) -> Device:
        deadline = time.monotonic() + timeout
        device = None
        while time.monotonic() < deadline:
            device = self.device(device_id)
            if device is not None and all(getattr(device, k) == v for k, v in wanted.items()):
                return device
            time.sleep(0.1)
        raise AssertionError(f"device {device_id} never reached {wanted}; last: {device}")


def _digits() -> tuple[list[list[int]], list[int]]:
    x, y = load_digits(return_X_y=True)
    return [[int(v) for v in row] for row in x[:400]], [int(v) for v in y[:400]]


IMAGES, LABELS = _digits()


def _health(label_shift: int) -> dict:
    """A health check on one digit; a shift other than 0 expects the wrong label (a bad release)."""
    return {"samples": [{"topic": "sensors/dev1/digits", "payload": {"id": "h1", "pixels": IMAGES[7]},
                         "expect": [{"topic": "results/dev1/digits",
                                     "json": {"label": (LABELS[7] + label_shift) % 10}}]}]}


def _labelled(label_shift: int) -> dict:
    """A health check of 40 labelled digits the model has not been fitted to (the last images of the first
    400); a shift other than 0 stands for a delegate that changes the numbers: every answer is wrong."""
    held_out = range(360, 400)
    return {"samples": [{"topic": "sensors/dev1/digits", "payload": {"id": f"a{n}", "pixels": IMAGES[n]},
                         "label": (LABELS[n] + label_shift) % 10} for n in held_out]}


def _version_of(fn: Path, dest: Path, version: str) -> Path:
    """A copy of the built function whose manifest says `version` (the same component)."""
    copy = dest / f"digits-{version}" / "digits"
    shutil.copytree(fn, copy)
    manifest = copy / "edgefn.toml"
    manifest.write_text(manifest.read_text().replace('version = "1.0.0"', f'version = "{version}"'))
    wasm = copy / "build" / "digits.wasm"
    later = time.time() + 5
    os.utime(wasm, (later, later))  # built after its manifest: not stale
    return copy


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, digits_fn: Path) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    ops = base / "ops"
    init_keys(ops)
    with start_fleet_server(base / "data", step_s=0.1, fleet_root=ops / ROOT_FILE,
                            token=OPERATOR["Authorization"].split()[1]) as server:
        for version, check in (("2.0.0", _health(0)), ("3.0.0", _health(1)), ("1.5.0", _health(0)),
                               ("4.0.0", _labelled(0)), ("5.0.0", _labelled(3))):
            health = base / f"health-{version}.json"
            health.write_text(json.dumps(check))
            out = base / f"digits-{version}.bundle.tar"
            build_bundle([_version_of(digits_fn, base, version)], "digits", version, out, models=[MODELS],
                         variants=["fp32"], health=health)
            result = runner.invoke(app, ["fleet", "push", str(out), "--keys", str(ops), "--server", server.url],
                                   env={"EDGEFN_FLEET_TOKEN": OPERATOR["Authorization"].split()[1]})
            assert result.exit_code == 0, result.output
        yield Fleet(server, ops)


def _payload(n: int, prefix: str) -> bytes:
    return json.dumps({"id": f"{prefix}-{n}", "pixels": IMAGES[n % len(IMAGES)]}).encode()


@pytest.fixture()
def device(fleet: Fleet, broker: LocalBroker, settings_for, digits_fn: Path) -> Iterator[callable]:
    """device(id, group) -> a started daemon (local digits 1.0.0) with the fleet agent."""
    daemons: list[Daemon] = []

    def make(device_id: str, group: str) -> Daemon:
        daemon = Daemon(settings_for(broker, digits_fn, fleet_url=fleet.server.url, device_id=device_id, group=group,
                                     fleet_root=fleet.root, fleet_poll_s=0.1,
                                     device_token=fleet.enroll(device_id, group)))
        daemon.start()
        daemons.append(daemon)
        daemon.wait_connected(10)
        fleet.wait_device(device_id, state="idle")
        return daemon

    yield make
    for d in daemons:
        d.stop()


def test_a_daemon_updated_while_events_stream_loses_none_and_says_which_version_answered(
        fleet: Fleet, device, broker: LocalBroker, collector):
    results = collector("results/+/digits")
    daemon = device("stream-1", "stream")
    total = 400

    def sensor() -> None:  # a steady 100 events/s across the update
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="stream-sensor")
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            for n in range(total):
                client.publish("sensors/dev1/digits", _payload(n, "s"), qos=1).wait_for_publish(10)
                time.sleep(0.01)
        finally:
            client.disconnect()
            client.loop_stop()

    feeding = threading.Thread(target=sensor)
    feeding.start()
    time.sleep(0.5)
    rollout = fleet.rollout("2.0.0", "stream")
    feeding.join()
    fleet.wait_device("stream-1", state="active", version="2.0.0")
    messages = results.wait_for(total, timeout=30)

    ids = [body["event_id"] for _, body in messages]
    assert sorted(ids) == sorted(f"s-{n}" for n in range(total)), "every event answered exactly once"
    for (_, body), props in zip(messages, results.properties, strict=True):
        n = int(body["event_id"].split("-")[1])
        assert body["label"] == LABELS[n % len(LABELS)]
        assert props["edgefn-function"] in ("digits@1.0.0", "digits@2.0.0")
        assert ("edgefn-release" in props) == (props["edgefn-function"] == "digits@2.0.0")
    versions = [p["edgefn-function"] for p in results.properties]
    switch = versions.index("digits@2.0.0")
    assert switch > 0, "the update happened while events streamed, not before"
    assert set(versions[switch:]) == {"digits@2.0.0"}, "after the switch, only the new version answers"
    assert results.properties[-1]["edgefn-release"] == "digits@2.0.0"
    assert daemon.health()["release"] == "digits@2.0.0"
    assert fleet.get_rollout(rollout.id).state == "done"
    assert FleetStore(daemon.fleet.dir).update() is None, "the update is over: no update.json left"
    (activated,) = audit_of(daemon)
    assert (activated["event"], activated["bundle"], activated["version"], activated["rollout"]) == \
        ("activated", "digits", "2.0.0", rollout.id)
    assert activated["previous"] is None and len(activated["sha256"]) == 64
    # The fleet report carries what the function cost: every event, across both versions, was one invocation.
    deadline = time.monotonic() + 15
    while (usage := fleet.device("stream-1").usage.get("digits")) is None or usage.invocations < total:
        assert time.monotonic() < deadline, f"the reported usage never counted {total} events: {usage}"
        time.sleep(0.2)
    assert usage.invocations == total and usage.guest_cpu_s > 0 and usage.infer_local_calls > 0
    assert usage.bytes_in == sum(len(_payload(n, "s")) for n in range(total))


def test_a_release_that_fails_its_health_check_rolls_itself_back(fleet: Fleet, device):
    daemon = device("bad-1", "bad")
    rollout = fleet.rollout("3.0.0", "bad")
    found = fleet.wait_device("bad-1", state="rolled-back")
    assert "health check failed" in found.detail and "expected" in found.detail
    assert daemon.release is None and daemon.health()["functions"] == {"digits": "1.0.0"}
    halted = _wait_rollout(fleet, rollout.id, "halted")
    assert halted.rolled_back and "bad-1" in halted.reason
    activated, rolled_back = audit_of(daemon)
    assert (activated["event"], activated["version"]) == ("activated", "3.0.0")
    assert (rolled_back["event"], rolled_back["by"], rolled_back["version"], rolled_back["to"]) == \
        ("rolled-back", "device", "3.0.0", "local functions")
    assert "health check failed" in rolled_back["reason"] and rolled_back["rollout"] == rollout.id
    time.sleep(0.5)  # the agent does not try the same release of the same rollout again
    assert fleet.device("bad-1").state == "rolled-back" and daemon.release is None


def test_an_older_release_is_refused_and_the_current_one_keeps_running(fleet: Fleet, device):
    daemon = device("old-1", "old")
    first = fleet.rollout("2.0.0", "old")
    fleet.wait_device("old-1", state="active", version="2.0.0")
    _wait_rollout(fleet, first.id, "done")
    fleet.rollout("1.5.0", "old")
    found = fleet.wait_device("old-1", state="failed")
    assert "older than 2.0.0" in found.detail
    assert [e["event"] for e in audit_of(daemon)] == ["activated", "refused"]
    refused = audit_of(daemon)[-1]
    assert refused["version"] == "1.5.0" and "older than 2.0.0" in refused["reason"]
    assert found.version == "2.0.0" and daemon.release is not None and daemon.release.version == "2.0.0"


def test_a_device_rolls_back_by_itself_when_its_error_rate_breaks_the_gate(fleet: Fleet, device, broker: LocalBroker):
    daemon = device("gate-1", "gate")
    fleet.rollout("2.0.0", "gate", gate="error_rate<0.2", soak_s=20)
    fleet.wait_device("gate-1", state="checking", version="2.0.0")
    publish(broker.port, "sensors/dev1/digits", [b"not json"] * 5)
    found = fleet.wait_device("gate-1", state="rolled-back", timeout=15)
    assert "error_rate<0.2" in found.detail
    assert daemon.release is None


def test_a_canary_measures_its_accuracy_and_the_gate_lets_the_rollout_through(fleet: Fleet, device):
    device("acc-1", "acc")
    rollout = fleet.rollout("4.0.0", "acc", gate="accuracy>=0.9")
    found = fleet.wait_device("acc-1", state="active", version="4.0.0")
    assert found.health.accuracy is not None and found.health.accuracy >= 0.9
    done = _wait_rollout(fleet, rollout.id, "done")
    assert done.waves[0].gate_values["accuracy"] == found.health.accuracy


def test_an_accuracy_below_the_gate_rolls_the_canary_back_and_holds_the_rollout(fleet: Fleet, device):
    daemon = device("acc-2", "acc-low")
    rollout = fleet.rollout("5.0.0", "acc-low", gate="accuracy>=0.9")
    found = fleet.wait_device("acc-2", state="rolled-back")
    assert "gate broken here: accuracy>=0.9 (measured 0)" in found.detail
    assert daemon.release is None and daemon.health()["functions"] == {"digits": "1.0.0"}
    halted = _wait_rollout(fleet, rollout.id, "halted")
    assert halted.rolled_back and "acc-2" in halted.reason


def test_an_accuracy_gate_on_a_release_without_labelled_samples_is_refused(fleet: Fleet, device):
    device("acc-3", "acc-none")
    fleet.rollout("2.0.0", "acc-none", gate="accuracy>=0.9")
    found = fleet.wait_device("acc-3", state="rolled-back")
    assert "the rollout's gate holds accuracy, and the health check has no labelled sample" in found.detail


def test_a_fleet_device_without_local_functions_waits_for_its_release(fleet: Fleet, broker: LocalBroker, settings_for,
                                                                      tmp_path: Path, collector):
    results = collector("results/+/digits")
    daemon = Daemon(settings_for(broker, tmp_path / "no-functions", fleet_url=fleet.server.url, device_id="bare-1",
                                 group="bare", fleet_root=fleet.root, fleet_poll_s=0.1,
                                 device_token=fleet.enroll("bare-1", "bare")))
    daemon.start()
    try:
        assert daemon.functions == [] and daemon.health()["functions"] == {}
        fleet.wait_device("bare-1", state="idle")
        fleet.rollout("2.0.0", "bare")
        fleet.wait_device("bare-1", state="active", version="2.0.0")
        publish(broker.port, "sensors/dev1/digits", [_payload(3, "bare")])
        (_, body), = results.wait_for(1)
        assert body["label"] == LABELS[3] and results.properties[0]["edgefn-release"] == "digits@2.0.0"
    finally:
        daemon.stop()


def test_an_aborted_rollout_sends_the_device_back_even_mid_soak(fleet: Fleet, device):
    daemon = device("abort-1", "abort")
    rollout = fleet.rollout("2.0.0", "abort", soak_s=60)
    fleet.wait_device("abort-1", state="checking", version="2.0.0")
    response = httpx.post(f"{fleet.server.url}{API}/rollouts/{rollout.id}/abort", headers=OPERATOR, timeout=10)
    assert response.status_code == 200, response.text
    found = fleet.wait_device("abort-1", state="rolled-back", timeout=15)
    assert f"rollout {rollout.id}" in found.detail and found.version is None
    assert daemon.release is None and daemon.health()["functions"] == {"digits": "1.0.0"}
    rolled_back = audit_of(daemon)[-1]
    assert (rolled_back["event"], rolled_back["by"], rolled_back["version"], rolled_back["rollout"]) == \
        ("rolled-back", "fleet", "2.0.0", rollout.id)
    assert FleetStore(daemon.fleet.dir).update() is None


def test_a_release_that_no_longer_loads_at_start_is_rolled_back_by_the_daemon(
        fleet: Fleet, broker: LocalBroker, settings_for, digits_fn: Path):
    settings = settings_for(broker, digits_fn, fleet_url=fleet.server.url, device_id="broken-1", group="broken",
                            fleet_root=fleet.root, fleet_poll_s=0.1, device_token=fleet.enroll("broken-1", "broken"))
    daemon = Daemon(settings)
    daemon.start()
    try:
        fleet.wait_device("broken-1", state="idle")
        fleet.rollout("2.0.0", "broken")
        fleet.wait_device("broken-1", state="active", version="2.0.0")
        release = daemon.release
    finally:
        daemon.stop()
    (daemon.fleet.bundle_dir(release) / "functions" / "digits" / "digits.wasm").write_bytes(b"not a component")
    again = Daemon(settings)
    again.start()
    try:
        assert again.release is None and again.health()["functions"] == {"digits": "1.0.0"}
        found = fleet.wait_device("broken-1", state="rolled-back")
        assert "digits@2.0.0 does not start" in found.detail
        assert again.fleet.active().refused, "not tried again for that rollout"
        assert [(e["event"], e.get("by")) for e in audit_of(again)] == \
            [("activated", None), ("rolled-back", "device")]
    finally:
        again.stop()


def audit_of(daemon: Daemon) -> list[dict]:
    """The device's audit log, read as a person would: the JSON lines of <state_dir>/fleet/audit.jsonl."""
    path = daemon.settings.state_dir / "fleet" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_rollout(fleet: Fleet, rollout_id: int, state: str, timeout: float = 20.0) -> Rollout:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rollout = fleet.get_rollout(rollout_id)
        if rollout.state == state:
            return rollout
        time.sleep(0.1)
    raise AssertionError(f"rollout {rollout_id} never {state}: {rollout}")


# --- SIGKILL at every step -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeviceProcess:
    """`edgefn run --fleet ...` as a process of its own, so it can be killed."""

    def __init__(self, fleet: Fleet, broker: LocalBroker, fn: Path, state: Path, device_id: str, kill_at: str | None,
                 env_extra: dict[str, str] | None = None):
        self.port = _free_port()
        env = {**{k: v for k, v in os.environ.items() if k != "EDGEFN_FLEET_KILL_AT"}, **(env_extra or {})}
        if kill_at:
            env["EDGEFN_FLEET_KILL_AT"] = kill_at
        self.log = state.parent / f"{device_id}.log"
        token = state.parent / f"{device_id}.token"  # the credential from a file, as a device is given it
        if not token.exists():
            token.write_text(fleet.enroll(device_id, device_id) + "\n")
        self._stderr = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefn", "run", "--broker", broker.url, "--functions", str(fn), "--models",
             str(MODELS), "--state-dir", str(state), "--client-id", f"kill-{device_id}", "--no-build",
             "--metrics-port", str(self.port), "--fleet", fleet.server.url, "--device-id", device_id,
             "--group", device_id, "--fleet-root", str(fleet.root), "--device-token-file", str(token),
             "--fleet-poll", "0.1", "--log-level", "info"],
            env=env, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def healthz(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the daemon exited: {self.log.read_text()[-2000:]}"
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"no /healthz: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        stop_gracefully(self.proc, 20)
        self._stderr.close()


@pytest.mark.parametrize("step", UPDATE_STEPS)
def test_a_device_killed_at_any_step_of_an_update_comes_back_whole_and_finishes_it(
        step: str, fleet: Fleet, broker: LocalBroker, digits_fn: Path, tmp_path: Path, component_cache: Path,
        collector):
    results = collector("results/+/digits")
    state = tmp_path / "state"
    state.mkdir()
    (state / "components").symlink_to(component_cache, target_is_directory=True)
    device_id = f"kill-{step}"
    first = DeviceProcess(fleet, broker, digits_fn, state, device_id, kill_at=step)
    try:
        first.healthz()
        fleet.wait_device(device_id, state="idle")
        fleet.rollout("2.0.0", device_id, soak_s=0.3)
        assert first.proc.wait(60) == -signal.SIGKILL, "the test hook killed the daemon at that step"
    finally:
        first.stop()
    publish(broker.port, "sensors/dev1/digits", [_payload(n, device_id) for n in range(20)])  # while it is down

    activated = step in ("checking", "reporting")  # active.json named the new release before the kill
    second = DeviceProcess(fleet, broker, digits_fn, state, device_id, kill_at=None)
    try:
        health = second.healthz()
        assert health["release"] == ("digits@2.0.0" if activated else None), "old or new, as the step says"
        assert health["functions"] == {"digits": "2.0.0" if activated else "1.0.0"}, "never a mix"
        fleet.wait_device(device_id, state="active", version="2.0.0")
        assert second.healthz()["release"] == "digits@2.0.0"
        assert FleetStore(state / "fleet").update() is None
        answered = results.wait_for(20, timeout=20)
        assert sorted(b["event_id"] for _, b in answered) == sorted(f"{device_id}-{n}" for n in range(20))
    finally:
        second.stop()


# --- a device whose clock is off --------------------------------------------------------------------------

FAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), None)  # Debian's faketime package


def test_a_device_whose_clock_is_8_days_fast_reports_clock_skew_and_updates_once_its_clock_is_set(
        fleet: Fleet, broker: LocalBroker, digits_fn: Path, tmp_path: Path, component_cache: Path):
    """Its TUF refusal is right (the timestamp looks expired to it), but it is the device's problem: no
    failed install, no halted rollout, no refusal kept; it updates once its clock is sane."""
    if FAKETIME is None:
        pytest.fail("libfaketime is missing: make system-deps installs it (Debian package faketime)")
    state = tmp_path / "state"
    state.mkdir()
    (state / "components").symlink_to(component_cache, target_is_directory=True)
    offset = tmp_path / "faketime"
    offset.write_text("+8d\n")
    # The wall clock only (monotonic clocks keep going), re-read every second so the test can set it right.
    clock = {"LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_CACHE_DURATION": "1",
             "DONT_FAKE_MONOTONIC": "1"}
    device = DeviceProcess(fleet, broker, digits_fn, state, "skew-1", None, env_extra=clock)
    try:
        fleet.wait_device("skew-1", state="idle")
        rollout = fleet.rollout("2.0.0", "skew-1", soak_s=0.3)
        found = fleet.wait_device("skew-1", state="clock-skew", timeout=30)
        assert "8.0 days ahead of the fleet server's" in found.detail, found.detail
        time.sleep(1.0)  # the engine steps meanwhile: a clock-skew report halts nothing
        assert fleet.get_rollout(rollout.id).state == "running"
        offset.write_text("+0\n")  # NTP set the clock
        fleet.wait_device("skew-1", state="active", version="2.0.0", timeout=60)
        assert _wait_rollout(fleet, rollout.id, "done").state == "done"
    finally:
        device.stop()
