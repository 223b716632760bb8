"""A fleet server closed to strangers: each attack that worked against the open server of old, tried
against one started the README's way (the operator's token, the root pinned, devices enrolled), and
refused. The server runs in a thread; `edgefn cloud serve` itself is run where the attack is on how it
starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cloud_sync.fleet.repository import TufRepository
from cloud_sync.fleet.server import FleetLimits, FleetServer, start_fleet_server
from edgefn.cli.main import app
from edgefn.errors import ConfigError, EdgefnError, PublishRefused
from edgefn.fleet.pack import BundleInfo, build_bundle
from edgefn.fleet.signing import add_release, init_keys, metadata_dir
from edgefn.protocol.fleet import API

runner = CliRunner()
TOKEN = "operator-s3cret"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def bundle(tiny_fn: Path, tmp_path: Path):
    def make(version: str) -> BundleInfo:
        return build_bundle([tiny_fn], "tiny", version, tmp_path / "out" / f"tiny-{version}.tar", models=[])

    return make


def serve(tmp_path: Path, ops: Path, **options: Any) -> FleetServer:
    return start_fleet_server(tmp_path / "data", step_s=0, token=TOKEN, fleet_root=metadata_dir(ops) / "1.root.json",
                              **options)


@pytest.fixture()
def fleet(tmp_path: Path, ops: Path) -> Iterator[FleetServer]:
    with serve(tmp_path, ops) as server:
        yield server


@pytest.fixture()
def client(fleet: FleetServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url + API, timeout=30) as c:
        yield c


def enroll(client: httpx.Client, device: str, group: str = "lab") -> dict[str, str]:
    """The device's credential as a header, from the operator's enrollment."""
    answer = client.post("/enrollments", json={"device_id": device, "group": group}, headers=OPERATOR)
    assert answer.status_code == 201, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}


def report(client: httpx.Client, device: str, headers: dict[str, str] | None, state: str = "idle",
           group: str = "lab", **fields: Any) -> httpx.Response:
    return client.post(f"/devices/{device}/report", json={"group": group, "state": state, **fields},
                       headers=headers or {})


def publish(ops: Path, fleet: FleetServer, info: BundleInfo) -> None:
    result = runner.invoke(app, ["fleet", "push", str(info.path), "--keys", str(ops), "--server", fleet.url],
                           env={"EDGEFN_FLEET_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output


def create(client: httpx.Client, **options: Any) -> httpx.Response:
    return client.post("/rollouts", json={"bundle": "tiny", "version": "1.0.0", "group": "lab", **options},
                       headers=OPERATOR)


# --- closed by default ------------------------------------------------------------------------------------


def test_the_server_refuses_to_start_without_operator_credentials(tmp_path: Path, ops: Path):
    with pytest.raises(ConfigError, match="needs the operator's credential"):
        start_fleet_server(tmp_path / "data", step_s=0, fleet_root=metadata_dir(ops) / "1.root.json")
    result = runner.invoke(app, ["cloud", "serve", "--data", str(tmp_path / "data"), "--port", "0",
                                 "--fleet-root", str(metadata_dir(ops) / "1.root.json")])
    assert result.exit_code == 2 and "--insecure" in result.output


def test_a_fresh_server_takes_no_root_from_the_network(tmp_path: Path, ops: Path, bundle):
    """The stolen root: a fresh server once trusted whichever 1.root.json came first."""
    with pytest.raises(ConfigError, match="no trusted root yet: give --fleet-root"):
        start_fleet_server(tmp_path / "data", step_s=0, token=TOKEN)
    attacker = tmp_path / "attacker"
    init_keys(attacker)
    repository = TufRepository(tmp_path / "bare")
    with pytest.raises(PublishRefused, match="takes none from the network"):
        repository.publish([("1.root.json", (metadata_dir(attacker) / "1.root.json").read_bytes())], None)
    assert not repository.trusts_a_root
    with serve(tmp_path, ops) as fleet:  # pinned from the operator's repository: the attacker's root is refused
        files = add_release(attacker, bundle("1.0.0").path)
        answer = httpx.post(f"{fleet.url}{API}/publish", headers=OPERATOR,
                            files=[("metadata", (p.name, p.read_bytes())) for p in [
                                metadata_dir(attacker) / "1.root.json", *files]])
        assert answer.status_code == 400 and "not newer than the trusted version" in answer.json()["error"]


def _drain(pipe: Any) -> None:
    with pipe:
        pipe.read()


def test_cloud_serve_started_as_the_readme_says_refuses_strangers(tmp_path: Path):
    result = runner.invoke(app, ["fleet", "keys", "init", str(tmp_path / "ops")])
    assert result.exit_code == 0 and "operator token" in result.output, result.output
    token_file = tmp_path / "ops" / "operator.token"
    assert token_file.stat().st_mode & 0o077 == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "edgefn", "cloud", "serve", "--data", str(tmp_path / "data"), "--port", "0",
         "--fleet-root", str(tmp_path / "ops/repository/metadata/1.root.json"), "--token-file", str(token_file)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "400"})
    assert process.stderr is not None
    try:
        url = next((m.group(1) for line in process.stderr if (m := re.search(r"serving the fleet on (\S+)", line))),
                   None)
        assert url, f"exited with {process.poll()} before listening"
        threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
        with httpx.Client(base_url=url + API, timeout=30) as client:
            assert report(client, "a-001", None).status_code == 401
            assert create(client).status_code != 201
            assert client.post("/rollouts", json={"bundle": "t", "version": "1", "group": "lab"}).status_code == 401
            enrolled = runner.invoke(app, ["fleet", "devices", "enroll", "a-001", "--group", "lab", "--server", url],
                                     env={"EDGEFN_FLEET_TOKEN": token_file.read_text().strip()})
            assert enrolled.exit_code == 0, enrolled.output
            device = {"Authorization": f"Bearer {enrolled.output.strip()}"}
            assert report(client, "a-001", device).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


# --- device identity ----------------------------------------------------------------------------------------


def test_a_stranger_cannot_join_a_group_and_become_the_canary(ops: Path, bundle, fleet: FleetServer,
                                                              client: httpx.Client):
    """The fake canary: `0-evil` reported itself into the group, sorted first and passed the canary wave."""
    device = enroll(client, "a-001")
    assert report(client, "a-001", device).status_code == 200
    assert report(client, "0-evil", None).status_code == 401
    assert report(client, "0-evil", {"Authorization": "Bearer made-up"}).status_code == 403
    assert report(client, "0-evil", device).status_code == 403  # another device's credential
    assert client.get("/devices/a-001/desired").status_code == 401
    publish(ops, fleet, bundle("1.0.0"))
    made = create(client, canary=1, waves=[100])
    assert made.status_code == 201, made.text
    assert [w["devices"] for w in made.json()["waves"]] == [["a-001"]]


def test_the_operator_names_the_canary_among_enrolled_devices(ops: Path, bundle, fleet: FleetServer,
                                                              client: httpx.Client):
    for name in ("a-001", "a-002", "a-003"):
        assert report(client, name, enroll(client, name)).status_code == 200
    publish(ops, fleet, bundle("1.0.0"))
    refused = create(client, canary_devices=["z-999"])
    assert refused.status_code == 400 and "z-999" in refused.json()["error"]
    made = create(client, canary_devices=["a-003"], waves=[100])
    assert [w["devices"] for w in made.json()["waves"]] == [["a-003"], ["a-001", "a-002"]]


def test_a_device_stays_in_its_enrolled_group(client: httpx.Client):
    device = enroll(client, "a-001", "lab")
    answer = report(client, "a-001", device, group="production")
    assert answer.status_code == 403 and "enrolled in group 'lab'" in answer.json()["error"]


def test_a_revoked_device_is_refused_and_left_out_of_new_rollouts(ops: Path, bundle, fleet: FleetServer,
                                                                 client: httpx.Client):
    kept, gone = enroll(client, "a-001"), enroll(client, "a-002")
    assert report(client, "a-001", kept).status_code == report(client, "a-002", gone).status_code == 200
    assert client.post("/enrollments/a-002/revoke").status_code == 401
    result = runner.invoke(app, ["fleet", "devices", "revoke", "a-002", "--server", fleet.url],
                           env={"EDGEFN_FLEET_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert report(client, "a-002", gone).status_code == 403
    publish(ops, fleet, bundle("1.0.0"))
    assert [w["devices"] for w in create(client, canary=0).json()["waves"]] == [["a-001"]]
    again = enroll(client, "a-002")  # enrolled again: a new credential, the old one stays dead
    assert report(client, "a-002", again).status_code == 200 and report(client, "a-002", gone).status_code == 403


def test_a_spoofed_failure_report_does_not_halt_the_rollout(ops: Path, bundle, fleet: FleetServer,
                                                            client: httpx.Client):
    """The spoofed halt: one anonymous "failed" report halted the rollout and rolled every device back."""
    canary, other = enroll(client, "a-001"), enroll(client, "a-002")
    report(client, "a-001", canary)
    report(client, "a-002", other)
    publish(ops, fleet, bundle("1.0.0"))
    rollout = create(client, canary=1, waves=[100], soak_s=60).json()
    spoof = {"state": "failed", "bundle": "tiny", "version": "1.0.0", "rollout": rollout["id"], "detail": "spoofed"}
    assert report(client, "a-001", None, **spoof).status_code == 401
    assert report(client, "a-001", other, **spoof).status_code == 403
    fleet.engine.step()
    assert client.get(f"/rollouts/{rollout['id']}").json()["state"] == "running"
    assert report(client, "a-001", canary, **{**spoof, "detail": "its own"}).status_code == 200
    fleet.engine.step()
    halted = client.get(f"/rollouts/{rollout['id']}").json()
    assert halted["state"] == "halted" and "its own" in halted["reason"]


# --- reports validated ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("health", [{"events": -1000, "errors": -500}, {"events": 10, "errors": 11},
                                    {"events": 2**70}, {"events": 1, "p99_ms": -1}, {"p99_ms": 1e300}])
def test_impossible_counters_are_refused(client: httpx.Client, health: dict[str, Any]):
    device = enroll(client, "a-001")
    answer = report(client, "a-001", device, health=health)
    assert answer.status_code == 400, answer.text
    assert "error" in answer.json()


@pytest.mark.parametrize("fields", [{"group": "x" * 200}, {"detail": "x" * 5000}, {"agent": "x" * 500},
                                    {"bundle": "../../etc"}, {"rollout": 2**70}, {"state": "hacked"}])
def test_oversized_or_malformed_report_fields_are_refused(client: httpx.Client, fields: dict[str, Any]):
    device = enroll(client, "a-001")
    assert report(client, "a-001", device, **fields).status_code == 400


def test_counters_that_go_down_within_a_rollout_are_a_flagged_reset_not_a_clean_slate(
        ops: Path, bundle, fleet: FleetServer, client: httpx.Client):
    """The gate bypass: lower (once negative) counters cancelled a device's 40 % error rate."""
    device = enroll(client, "a-001")
    report(client, "a-001", device)
    publish(ops, fleet, bundle("1.0.0"))
    rollout = create(client, canary=1, waves=[100], soak_s=60,
                     gate=[{"metric": "error_rate", "op": "<", "limit": 0.1}]).json()
    running = {"state": "active", "bundle": "tiny", "version": "1.0.0", "rollout": rollout["id"]}
    report(client, "a-001", device, **running, health={"events": 0, "errors": 0})
    fleet.engine.step(0)  # installed: the canary soaks
    report(client, "a-001", device, **running, health={"events": 100, "errors": 40})
    report(client, "a-001", device, **running, health={"events": 1000, "errors": 0})  # a "restart" with a clean slate
    found = next(d for d in client.get("/devices").json()["devices"] if d["id"] == "a-001")
    assert found["counter_resets"] == 1
    assert (found["health"]["events"], found["health"]["errors"]) == (1100, 40)
    report(client, "a-001", device, **running, health={"events": 2000, "errors": 300})
    fleet.engine.step(1)
    halted = client.get(f"/rollouts/{rollout['id']}").json()
    assert halted["state"] == "halted" and "error_rate" in halted["reason"], halted


# --- bounded requests -----------------------------------------------------------------------------------------


def test_an_oversized_report_is_refused_before_it_is_read(client: httpx.Client):
    device = enroll(client, "a-001")
    big = b'{"group": "lab", "state": "idle", "detail": "' + b"x" * (5 << 20) + b'"}'
    declared = client.post("/devices/a-001/report", content=big, headers=device)
    assert declared.status_code == 413 and "larger than" in declared.json()["error"]

    def streamed() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1 << 16):
            yield big[start:start + (1 << 16)]

    assert client.post("/devices/a-001/report", content=streamed(), headers=device).status_code == 413
    assert client.post("/devices/a-001/report", content=streamed()).status_code == 413  # before the credential
    assert report(client, "a-001", device).status_code == 200  # and the server goes on


def test_nested_json_and_huge_numbers_are_400_not_500(client: httpx.Client):
    device = enroll(client, "a-001")
    nested = b'{"group": "lab", "state": "idle", "health": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert client.post("/devices/a-001/report", content=nested, headers=device).status_code == 400
    digits = b'{"group": "lab", "state": "idle", "health": {"events": ' + b"9" * 5000 + b"}}"
    assert client.post("/devices/a-001/report", content=digits, headers=device).status_code == 400
    assert client.get(f"/rollouts/{2**70}").status_code == 400


def test_an_oversized_bundle_is_refused_and_no_error_names_a_server_path(tmp_path: Path, ops: Path, bundle):
    with serve(tmp_path, ops, limits=FleetLimits(bundle_bytes=1 << 20)) as fleet:
        files = add_release(ops, bundle("1.0.0").path)
        metadata = [("metadata", (p.name, p.read_bytes())) for p in files]
        huge = [("bundle", ("b.tar", b"\0" * (20 << 20)))]
        answer = httpx.post(f"{fleet.url}{API}/publish", headers=OPERATOR, files=huge + metadata, timeout=30)
        assert answer.status_code == 413
        anonymous = httpx.post(f"{fleet.url}{API}/publish", files=[("bundle", ("b.tar", b"\0" * 1000))], timeout=30)
        assert anonymous.status_code == 401
        junk = [("bundle", ("b.tar", b"not a tar at all" * 100))]
        answer = httpx.post(f"{fleet.url}{API}/publish", headers=OPERATOR, files=junk + metadata, timeout=30)
        error = answer.json()["error"]
        assert answer.status_code == 400 and "the upload is not a bundle" in error
        assert str(tmp_path) not in error and "/tmp" not in error, error
        assert not [p for p in (tmp_path / "data" / "tuf" / "targets").iterdir()], "nothing left behind"


# --- TLS ----------------------------------------------------------------------------------------------------------


def test_the_server_speaks_https_with_the_certificate_it_is_given(tmp_path: Path, ops: Path):
    import ssl

    from cryptography.hazmat.primitives.asymmetric import ec

    from cloud_sync.serve import Tls
    from tests.test_tls import _cert, _write

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("fleet test CA", ca_key, ca=True)
    tls = Tls(_write(tmp_path / "server.pem", _cert("localhost", server_key, ca, ca_key, san=True)),
              _write(tmp_path / "server.key", key=server_key))
    with serve(tmp_path, ops, tls=tls) as fleet:
        assert fleet.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(_write(tmp_path / "ca.pem", ca)))
        answer = httpx.get(f"{fleet.url}{API}/devices", verify=trust, timeout=10)
        assert answer.status_code == 200
        with pytest.raises(httpx.HTTPError):  # a client that does not trust it
            httpx.get(f"{fleet.url}{API}/devices", timeout=10)
    result = runner.invoke(app, ["cloud", "serve", "--models", "models", "--ssl-certfile", str(tls.certfile)])
    assert result.exit_code == 2 and "--ssl-keyfile" in result.output
    with pytest.raises(EdgefnError, match="TLS: cannot use"):
        serve(tmp_path / "again", ops, tls=Tls(tls.keyfile, tls.keyfile))
