"""The fleet server (cloud_sync.fleet): publishing signed releases, devices and their desired state, the
rollout engine, `edgefn cloud serve --data`. The API and engine tests run on SQLite and on a real
PostgreSQL; releases are signed and pushed by the operator's own code, over real HTTP, and the engine is
stepped with a made-up clock instead of waiting for soak times and timeouts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from securesystemslib.signer import CryptoSigner
from typer.testing import CliRunner

from cloud_sync.fleet.db import Database, database_url
from cloud_sync.fleet.engine import plan_waves
from cloud_sync.fleet.server import FleetServer, start_fleet_server
from edgefn.cli.fleet import _upload
from edgefn.cli.main import app
from edgefn.errors import ConfigError, FleetError
from edgefn.fleet.fetch import ReleaseFetcher
from edgefn.fleet.pack import BundleInfo, build_bundle
from edgefn.fleet.signing import Repository, add_release, init_keys, metadata_dir
from edgefn.protocol.fleet import API
from tests.conftest import MODELS, TINY_TOML
from tests.pg import new_database, postgres  # noqa: F401 (postgres: the session's server, a fixture)

# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture()
def bundle(tiny_fn: Path, tmp_path: Path):
    def make(version: str, out: str = "out") -> BundleInfo:
        return build_bundle([tiny_fn], "tiny", version, tmp_path / out / f"tiny-{version}.tar", models=[])

    return make


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """Every API and engine test runs twice: on the default SQLite file and on a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else new_database(request.getfixturevalue("postgres"))


def trusted(ops: Path) -> Path:
    return metadata_dir(ops) / "1.root.json"


@pytest.fixture()
def fleet(tmp_path: Path, ops: Path, db_url: str | None) -> Iterator[FleetServer]:
    # step_s=0: no engine thread; each test steps it with the clock it wants. Open (insecure): these tests
    # are about rollouts; tests/test_fleet_security.py holds a closed server to its credentials.
    with start_fleet_server(tmp_path / "data", db_url=db_url, step_s=0, fleet_root=trusted(ops),
                            insecure=True) as server:
        yield server


@pytest.fixture()
def client(fleet: FleetServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=30) as c:
        yield c


def push(ops: Path, url: str, info: BundleInfo, *extra: str, env: dict[str, str] | None = None) -> Any:
    """`edgefn fleet push`, as the operator runs it."""
    return CliRunner().invoke(app, ["fleet", "push", str(info.path), "--keys", str(ops), "--server", url, *extra],
                              env=env)


def pushed(ops: Path, url: str, info: BundleInfo) -> None:
    result = push(ops, url, info)
    assert result.exit_code == 0, result.output


def report(client: httpx.Client, device: str, state: str = "idle", *, version: str | None = None,
           rollout: int | None = None, events: int = 0, errors: int = 0, p99: float | None = None,
           accuracy: float | None = None, detail: str = "", group: str = "g") -> dict[str, Any]:
    body = {"group": group, "state": state, "bundle": "tiny" if version else None, "version": version,
            "rollout": rollout, "detail": detail,
            "health": {"events": events, "errors": errors, "p99_ms": p99, "accuracy": accuracy}}
    response = client.post(f"{API}/devices/{device}/report", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def desired(client: httpx.Client, device: str) -> dict[str, Any]:
    response = client.get(f"{API}/devices/{device}/desired")
    assert response.status_code == 200, response.text
    return response.json()


def install(client: httpx.Client, devices: list[str], **health: Any) -> None:
    """Each device installs what it is told to run, as an agent would, and reports it active."""
    for device in devices:
        wanted = desired(client, device)
        report(client, device, "active", version=wanted["version"], rollout=wanted["rollout"], **health)


def start_rollout(client: httpx.Client, version: str, **options: Any) -> dict[str, Any]:
    response = client.post(f"{API}/rollouts", json={"bundle": "tiny", "version": version, "group": "g", **options})
    assert response.status_code == 201, response.text
    return response.json()


def rollout(client: httpx.Client, rollout_id: int) -> dict[str, Any]:
    return client.get(f"{API}/rollouts/{rollout_id}").json()


def roll_out_all(fleet: FleetServer, client: httpx.Client, version: str, now: float) -> dict[str, Any]:
    """A rollout with no soak driven to its end: every wave installs and passes."""
    started = start_rollout(client, version, canary=1, waves=[100], soak_s=0)
    for _ in started["waves"]:
        current = rollout(client, started["id"])
        install(client, current["waves"][current["current_wave"]]["devices"])
        fleet.engine.step(now)
    done = rollout(client, started["id"])
    assert done["state"] == "done", done
    return done


def group(client: httpx.Client, n: int = 6) -> list[str]:
    devices = [f"d{i}" for i in range(n)]
    for device in devices:
        report(client, device)
    return devices


# --- publishing -----------------------------------------------------------------------------------------


def test_publish_stores_and_serves_a_signed_release(ops: Path, bundle, fleet: FleetServer, client: httpx.Client):
    info = bundle("1.0.0")
    pushed(ops, fleet.url, info)
    [record] = client.get(f"{API}/bundles").json()["bundles"]
    assert (record["name"], record["version"], record["target"]) == ("tiny", "1.0.0", "tiny-1.0.0.bundle.tar")
    assert (record["sha256"], record["size"]) == (info.sha256, info.size)
    for name in ("1.root.json", "root.json", "1.targets.json", "1.snapshot.json", "timestamp.json"):
        served = client.get(f"/tuf/metadata/{name}")
        assert served.status_code == 200, name
        if name != "root.json":
            assert served.content == (metadata_dir(ops) / name).read_bytes()
    target = client.get(f"/tuf/targets/{info.sha256}.{info.target}")
    assert hashlib.sha256(target.content).hexdigest() == info.sha256
    assert client.get("/tuf/metadata/..%2Fmetadata%2Froot.json").status_code == 404
    assert client.get(f"/tuf/targets/{info.target}").status_code == 404  # only by hash


def test_publish_refuses_metadata_changed_after_signing(ops: Path, bundle, fleet: FleetServer, client: httpx.Client,
                                                         tmp_path: Path):
    info = bundle("1.0.0")
    files = add_release(ops, info.path)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in files:
        data = path.read_bytes()
        if path.name.endswith(".targets.json"):
            doc = json.loads(data)
            doc["signed"]["targets"][info.target]["length"] += 1
            data = json.dumps(doc).encode()
        (tampered / path.name).write_bytes(data)
    with pytest.raises(FleetError, match=r"HTTP 400.*1\.targets\.json: its signatures do not verify"):
        _upload(fleet.url, info.path, [tampered / p.name for p in files], None, 30)
    # Refused whole: nothing of it was kept.
    assert client.get("/tuf/metadata/1.targets.json").status_code == 404
    assert client.get(f"{API}/bundles").json()["bundles"] == []


def test_publish_refuses_a_bundle_that_is_not_the_one_signed(ops: Path, bundle, tiny_fn: Path, fleet: FleetServer,
                                                             client: httpx.Client, tmp_path: Path):
    info = bundle("1.0.0")
    files = add_release(ops, info.path)
    other_fn = tmp_path / "other" / "tiny"
    (other_fn / "build").mkdir(parents=True)
    (other_fn / "edgefn.toml").write_text(TINY_TOML)
    (other_fn / "build" / "tiny.wasm").write_bytes(b"\0asm\x0d\0\x01\0" + b"evil" * 64)
    other = build_bundle([other_fn], "tiny", "1.0.0", tmp_path / "evil.tar", models=[])
    with pytest.raises(FleetError, match="does not match its signed targets entry"):
        _upload(fleet.url, other.path, files, None, 30)
    assert client.get(f"/tuf/targets/{other.sha256}.{other.target}").status_code == 404
    _upload(fleet.url, info.path, files, None, 30)  # the signed one goes in
    assert client.get(f"/tuf/targets/{info.sha256}.{info.target}").status_code == 200


def test_publish_refuses_replayed_old_metadata(ops: Path, bundle, fleet: FleetServer, client: httpx.Client,
                                               tmp_path: Path):
    pushed(ops, fleet.url, bundle("1.0.0"))
    old = tmp_path / "old" / "timestamp.json"
    old.parent.mkdir()
    old.write_bytes((metadata_dir(ops) / "timestamp.json").read_bytes())
    pushed(ops, fleet.url, bundle("1.1.0"))
    with pytest.raises(FleetError, match="version 1 is older than version 2"):
        _upload(fleet.url, None, [old], None, 30)
    assert json.loads(client.get("/tuf/metadata/timestamp.json").content)["signed"]["version"] == 2
    # The same files again (a push that never heard the answer) are taken as a no-op.
    _upload(fleet.url, None, [metadata_dir(ops) / "timestamp.json"], None, 30)


def test_publish_refuses_a_root_the_server_does_not_trust(ops: Path, bundle, tmp_path: Path, db_url: str | None):
    rogue = tmp_path / "rogue"
    init_keys(rogue)
    with start_fleet_server(tmp_path / "data", db_url=db_url, step_s=0, fleet_root=trusted(ops),
                            insecure=True) as fleet:
        result = push(rogue, fleet.url, bundle("1.0.0"))
        assert result.exit_code != 0
        assert "root version 1 is not newer than the trusted version 1" in " ".join(result.output.split())
        pushed(ops, fleet.url, bundle("1.0.0", out="good"))


def test_a_new_root_must_be_signed_by_the_root_trusted_before_it(ops: Path, bundle, fleet: FleetServer,
                                                                  client: httpx.Client, tmp_path: Path):
    pushed(ops, fleet.url, bundle("1.0.0"))
    old_signer = Repository(ops).signer("root")
    new_signer = CryptoSigner.generate_ed25519()
    root = Repository(ops).root
    root.signed.revoke_key(old_signer.public_key.keyid, "root")
    root.signed.add_key(new_signer.public_key, "root")
    root.signed.version = 2
    root.signatures.clear()
    root.sign(new_signer)
    rotated = tmp_path / "rotated" / "2.root.json"
    rotated.parent.mkdir()
    rotated.write_bytes(root.to_bytes())
    with pytest.raises(FleetError, match="2.root.json: not signed by the threshold of root keys"):
        _upload(fleet.url, None, [rotated], None, 30)  # the new key alone cannot vouch for itself
    root.sign(old_signer, append=True)
    rotated.write_bytes(root.to_bytes())
    _upload(fleet.url, None, [rotated], None, 30)
    assert client.get("/tuf/metadata/2.root.json").content == rotated.read_bytes()
    assert client.get("/tuf/metadata/root.json").content == rotated.read_bytes()
    garbage = tmp_path / "rotated" / "3.root.json"
    garbage.write_bytes(b"{not json")
    with pytest.raises(FleetError, match="3.root.json: not TUF metadata"):
        _upload(fleet.url, None, [garbage], None, 30)


def test_publish_refuses_an_upload_that_is_not_a_bundle(ops: Path, bundle, fleet: FleetServer, tmp_path: Path):
    files = add_release(ops, bundle("1.0.0").path)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(FleetError, match="the upload is not a bundle"):
        _upload(fleet.url, junk, files, None, 30)


def test_publish_and_rollout_changes_need_the_token(ops: Path, bundle, tmp_path: Path, db_url: str | None):
    with start_fleet_server(tmp_path / "data", db_url=db_url, step_s=0, token="s3cret",
                            fleet_root=trusted(ops)) as fleet, \
            httpx.Client(base_url=fleet.url, timeout=30) as client:
        refused = push(ops, fleet.url, bundle("1.0.0"))
        assert refused.exit_code != 0 and "401" in refused.output
        result = push(ops, fleet.url, bundle("1.0.0"), "--token-env", "FLEET_TOKEN", env={"FLEET_TOKEN": "s3cret"})
        assert result.exit_code == 0, result.output
        operator = {"Authorization": "Bearer s3cret"}
        assert client.post(f"{API}/enrollments", json={"device_id": "d0", "group": "g"}).status_code == 401
        enrolled = client.post(f"{API}/enrollments", json={"device_id": "d0", "group": "g"}, headers=operator)
        client.headers["Authorization"] = f"Bearer {enrolled.json()['token']}"
        report(client, "d0")  # with its own credential
        del client.headers["Authorization"]
        request = {"bundle": "tiny", "version": "1.0.0", "group": "g"}
        assert client.post(f"{API}/rollouts", json=request).status_code == 401
        made = client.post(f"{API}/rollouts", json=request, headers={"Authorization": "Bearer s3cret"})
        assert made.status_code == 201
        assert client.post(f"{API}/rollouts/{made.json()['id']}/abort").status_code == 401


# --- devices --------------------------------------------------------------------------------------------


def test_a_device_registers_with_its_first_report(client: httpx.Client):
    answer = report(client, "pi-01", "active", version="0.9.0", events=10, errors=1, p99=12.5, group="lab")
    assert answer == {"device_id": "pi-01", "bundle": None, "version": None, "target": None, "rollout": None,
                      "gate": [], "soak_s": 0.0}
    report(client, "pi-01", "checking", version="0.9.0", group="lab")
    [device] = client.get(f"{API}/devices").json()["devices"]
    assert (device["id"], device["group"], device["state"], device["version"]) == ("pi-01", "lab", "checking", "0.9.0")
    assert device["last_seen"] == pytest.approx(time.time(), abs=30)
    bad = client.post(f"{API}/devices/no%20spaces/report", json={"group": "g", "state": "idle"})
    assert bad.status_code == 400 and "device id" in bad.json()["error"]
    assert client.post(f"{API}/devices/d/report", json={"group": "g", "state": "dancing"}).status_code == 400


def test_desired_has_an_etag_and_answers_304_until_it_changes(ops: Path, bundle, fleet: FleetServer,
                                                              client: httpx.Client):
    report(client, "d0")
    first = client.get(f"{API}/devices/d0/desired")
    tag = first.headers["etag"]
    again = client.get(f"{API}/devices/d0/desired", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    pushed(ops, fleet.url, bundle("1.0.0"))
    made = start_rollout(client, "1.0.0", canary=1, soak_s=5,
                         gate=[{"metric": "error_rate", "op": "<", "limit": 0.05}])
    changed = client.get(f"{API}/devices/d0/desired", headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    assert changed.json() == {"device_id": "d0", "bundle": "tiny", "version": "1.0.0",
                              "target": "tiny-1.0.0.bundle.tar", "rollout": made["id"],
                              "gate": [{"metric": "error_rate", "op": "<", "limit": 0.05}], "soak_s": 5.0}


def test_the_page_shows_the_devices_and_rollouts(ops: Path, bundle, fleet: FleetServer, client: httpx.Client):
    report(client, "pi-page", "active", version="0.9.0")
    report(client, "pi-page", group="g")
    pushed(ops, fleet.url, bundle("1.0.0"))
    start_rollout(client, "1.0.0")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "pi-page" in page.text and "1.0.0" in page.text


# --- rollouts -------------------------------------------------------------------------------------------


def test_a_rollout_goes_canary_then_waves_and_gives_the_group_its_release(ops: Path, bundle, fleet: FleetServer,
                                                                         client: httpx.Client):
    pushed(ops, fleet.url, bundle("1.0.0"))
    group(client)
    made = start_rollout(client, "1.0.0", canary=1, waves=[50, 100], soak_s=10,
                         gate=[{"metric": "error_rate", "op": "<", "limit": 0.05},
                               {"metric": "p99_ms", "op": "<", "limit": 50}])
    assert [(w["name"], w["devices"]) for w in made["waves"]] == [
        ("canary", ["d0"]), ("wave 1", ["d1", "d2"]), ("wave 2", ["d3", "d4", "d5"])]
    assert made["waves"][0]["state"] == "installing"
    assert desired(client, "d0")["version"] == "1.0.0" and desired(client, "d1")["version"] is None
    now = time.time()
    rid = made["id"]

    def wave_states() -> list[str]:
        return [w["state"] for w in rollout(client, rid)["waves"]]

    fleet.engine.step(now)
    assert wave_states() == ["installing", "pending", "pending"]  # the canary has not installed yet
    install(client, ["d0"], events=100, errors=1, p99=20)
    fleet.engine.step(now + 1)
    assert wave_states() == ["soaking", "pending", "pending"]
    fleet.engine.step(now + 6)
    assert wave_states() == ["soaking", "pending", "pending"] and desired(client, "d1")["version"] is None
    fleet.engine.step(now + 11.5)
    assert wave_states() == ["passed", "installing", "pending"]
    assert [desired(client, d)["version"] for d in ("d1", "d2", "d3")] == ["1.0.0", "1.0.0", None]
    install(client, ["d1", "d2"], events=100, errors=2, p99=30)
    fleet.engine.step(now + 12)
    fleet.engine.step(now + 23)
    install(client, ["d3", "d4", "d5"], events=50, errors=0, p99=10)
    fleet.engine.step(now + 24)
    fleet.engine.step(now + 35)
    done = rollout(client, rid)
    assert done["state"] == "done" and not done["rolled_back"]
    assert [w["state"] for w in done["waves"]] == ["passed"] * 3
    assert done["waves"][1]["gate_values"] == {"error_rate": pytest.approx(0.02), "p99_ms": 30.0,
                                               "install_failures": 0.0, "accuracy": None}
    assert done["waves"][1]["healthy"] == 2
    # A device that joins the group later is given the group's release.
    assert report(client, "d9")["version"] == "1.0.0"
    assert client.get(f"{API}/devices").json()["devices"][-1]["desired_version"] == "1.0.0"


@pytest.mark.parametrize("rule, health, says", [
    ({"metric": "error_rate", "op": "<", "limit": 0.05}, {"events": 100, "errors": 20}, "error_rate=0.2"),
    ({"metric": "p99_ms", "op": "<=", "limit": 50}, {"events": 100, "p99": 80.0}, "p99_ms=80"),
    # The worst device of the wave: one whose delegate changes the numbers holds the rollout.
    ({"metric": "accuracy", "op": ">=", "limit": 0.9}, {"events": 100, "accuracy": 0.7}, "accuracy=0.7"),
])
def test_a_broken_gate_halts_and_rolls_back_every_device_of_the_rollout(ops: Path, bundle, fleet: FleetServer,
                                                                       client: httpx.Client, rule: dict,
                                                                       health: dict, says: str):
    devices = group(client)
    pushed(ops, fleet.url, bundle("1.0.0"))
    now = time.time()
    first = roll_out_all(fleet, client, "1.0.0", now)
    pushed(ops, fleet.url, bundle("1.1.0"))
    made = start_rollout(client, "1.1.0", canary=1, waves=[50, 100], soak_s=10, gate=[rule])
    install(client, ["d0"], events=100)
    fleet.engine.step(now + 1)
    fleet.engine.step(now + 12)
    install(client, ["d1", "d2"], **health)
    fleet.engine.step(now + 13)
    halted = rollout(client, made["id"])
    assert halted["state"] == "halted" and halted["rolled_back"]
    assert says in halted["reason"] and "wave 1" in halted["reason"]
    assert [w["state"] for w in halted["waves"]] == ["passed", "failed", "pending"]
    # Every device of the rollout is told to go back to what it ran before; the rest keep the group's release.
    for device in devices[:3]:
        assert (desired(client, device)["version"], desired(client, device)["rollout"]) == ("1.0.0", made["id"])
    for device in devices[3:]:
        assert (desired(client, device)["version"], desired(client, device)["rollout"]) == ("1.0.0", first["id"])
    fleet.engine.step(now + 100)  # a halted rollout stays halted
    assert rollout(client, made["id"])["state"] == "halted"


def test_a_device_failing_its_install_halts_the_rollout(ops: Path, bundle, fleet: FleetServer, client: httpx.Client):
    group(client, 3)
    pushed(ops, fleet.url, bundle("1.0.0"))
    made = start_rollout(client, "1.0.0", canary=2, soak_s=10,
                         gate=[{"metric": "install_failures", "op": "<", "limit": 1}])
    install(client, ["d0"])
    report(client, "d1", "rolled-back", rollout=made["id"], detail="health check: no output on results/tiny")
    fleet.engine.step()
    halted = rollout(client, made["id"])
    assert halted["state"] == "halted"
    assert halted["reason"] == "device d1 reported rolled-back: health check: no output on results/tiny"
    assert halted["waves"][0]["gate_values"]["install_failures"] == 1
    # Neither ran anything from the fleet before: both are told to run nothing from it again.
    assert [desired(client, d)["bundle"] for d in ("d0", "d1", "d2")] == [None, None, None]


def test_a_wave_not_installed_in_time_halts_the_rollout(ops: Path, bundle, fleet: FleetServer, client: httpx.Client):
    group(client, 2)
    pushed(ops, fleet.url, bundle("1.0.0"))
    made = start_rollout(client, "1.0.0", canary=2, wave_timeout_s=30)
    install(client, ["d0"])
    now = time.time()
    fleet.engine.step(now + 20)
    assert rollout(client, made["id"])["state"] == "running"
    fleet.engine.step(now + 31)
    halted = rollout(client, made["id"])
    assert halted["state"] == "halted" and halted["rolled_back"]
    assert halted["reason"] == "canary was not installed within 30 s (1 of 2 devices active)"
    assert desired(client, "d0")["bundle"] is None


def test_pause_holds_the_next_wave_resume_goes_on_abort_rolls_back(ops: Path, bundle, fleet: FleetServer,
                                                                   client: httpx.Client):
    group(client, 4)
    pushed(ops, fleet.url, bundle("1.0.0"))
    rid = start_rollout(client, "1.0.0", canary=1, waves=[50, 100], soak_s=0)["id"]
    now = time.time()
    install(client, ["d0"])
    assert client.post(f"{API}/rollouts/{rid}/pause").json()["state"] == "paused"
    fleet.engine.step(now)
    paused = rollout(client, rid)
    assert [w["state"] for w in paused["waves"]] == ["passed", "pending", "pending"]
    assert desired(client, "d1")["version"] is None
    assert client.post(f"{API}/rollouts/{rid}/pause").status_code == 409
    resumed = client.post(f"{API}/rollouts/{rid}/resume").json()
    assert resumed["state"] == "running" and resumed["waves"][1]["state"] == "installing"
    assert desired(client, "d1")["version"] == "1.0.0"
    aborted = client.post(f"{API}/rollouts/{rid}/abort").json()
    assert (aborted["state"], aborted["reason"], aborted["rolled_back"]) == ("aborted", "aborted", True)
    assert [desired(client, d)["bundle"] for d in ("d0", "d1", "d2", "d3")] == [None] * 4
    again = client.post(f"{API}/rollouts/{rid}/abort")
    assert again.status_code == 409 and "aborted" in again.json()["error"]
    assert client.post(f"{API}/rollouts/{rid}/dance").status_code == 404
    assert client.post(f"{API}/rollouts/999/pause").status_code == 404


def test_rollout_requests_the_fleet_cannot_carry_out_are_refused(ops: Path, bundle, fleet: FleetServer,
                                                                client: httpx.Client):
    pushed(ops, fleet.url, bundle("1.0.0"))
    request = {"bundle": "tiny", "version": "1.0.0", "group": "g"}
    empty = client.post(f"{API}/rollouts", json=request)
    assert empty.status_code == 400 and "has no devices" in empty.json()["error"]
    report(client, "d0")
    unknown = client.post(f"{API}/rollouts", json={**request, "version": "9.9.9"})
    assert unknown.status_code == 404 and "no bundle tiny 9.9.9" in unknown.json()["error"]
    assert client.post(f"{API}/rollouts", json={**request, "waves": [50]}).status_code == 400
    assert client.post(f"{API}/rollouts", json=request).status_code == 201
    busy = client.post(f"{API}/rollouts", json=request)
    assert busy.status_code == 409 and "abort it first" in busy.json()["error"]
    assert [r["group"] for r in client.get(f"{API}/rollouts").json()["rollouts"]] == ["g"]


def test_the_engine_thread_moves_rollouts_on_by_itself(ops: Path, bundle, tmp_path: Path, db_url: str | None):
    with start_fleet_server(tmp_path / "data", db_url=db_url, step_s=0.05, fleet_root=trusted(ops),
                            insecure=True) as fleet, \
            httpx.Client(base_url=fleet.url, timeout=30) as client:
        group(client, 2)
        pushed(ops, fleet.url, bundle("1.0.0"))
        rid = start_rollout(client, "1.0.0", canary=1, soak_s=0)["id"]
        install(client, ["d0"])
        deadline = time.monotonic() + 10
        while rollout(client, rid)["current_wave"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert desired(client, "d1")["version"] == "1.0.0"


def test_concurrent_reports_while_the_engine_steps_lose_nothing(ops: Path, bundle, tmp_path: Path,
                                                                 db_url: str | None):
    """The API's threads and the engine thread share the database: every report lands, none fails."""
    with start_fleet_server(tmp_path / "data", db_url=db_url, step_s=0.01, fleet_root=trusted(ops),
                            insecure=True) as fleet:
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            devices = group(client, 40)
            pushed(ops, fleet.url, bundle("1.0.0"))
            rid = start_rollout(client, "1.0.0", canary=4, waves=[50, 100], soak_s=0)["id"]
        failures: list[str] = []

        def device_loop(ids: list[str]) -> None:
            with httpx.Client(base_url=fleet.url, timeout=30) as http:
                for _ in range(15):
                    for device in ids:
                        wanted = http.get(f"{API}/devices/{device}/desired").json()
                        body = {"group": "g", "state": "active" if wanted["version"] else "idle",
                                "bundle": wanted["bundle"], "version": wanted["version"], "rollout": wanted["rollout"],
                                "health": {"events": 10}}
                        answer = http.post(f"{API}/devices/{device}/report", json=body)
                        if answer.status_code != 200:
                            failures.append(answer.text)

        threads = [threading.Thread(target=device_loop, args=(devices[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            deadline = time.monotonic() + 10
            while rollout(client, rid)["state"] != "done" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert rollout(client, rid)["state"] == "done"
            assert {d["version"] for d in client.get(f"{API}/devices").json()["devices"]} == {"1.0.0"}


@pytest.mark.parametrize("canary, waves, planned", [
    (1, [50, 100], [["d0"], ["d1", "d2"], ["d3", "d4", "d5"]]),
    (0, [100], [["d0", "d1", "d2", "d3", "d4", "d5"]]),
    (1, [10, 100], [["d0"], ["d1", "d2", "d3", "d4", "d5"]]),  # 10% is within the canary: no empty wave
    (9, [100], [["d0", "d1", "d2", "d3", "d4", "d5"]]),
])
def test_plan_waves_splits_the_sorted_group(canary: int, waves: list[float], planned: list[list[str]]):
    got = plan_waves([f"d{i}" for i in (5, 3, 1, 0, 2, 4)], canary, waves)
    assert [w["devices"] for w in got] == planned
    assert [w["name"] for w in got][1:] == [f"wave {i}" for i in range(1, len(got))]


def test_database_urls():
    assert database_url(Path("/srv/fleet"), None) == "sqlite:////srv/fleet/fleet.sqlite"
    assert database_url(Path("x"), "postgresql://u@h/f") == "postgresql+psycopg://u@h/f"
    with pytest.raises(ConfigError, match="SQLite or PostgreSQL"):
        Database("mysql://u@h/f")
    with pytest.raises(FleetError, match="cannot open the fleet database"):
        Database("postgresql://nobody@127.0.0.1:1/none")


# --- the device's side and the command ----------------------------------------------------------------


def test_a_device_fetches_a_pushed_release_through_tuf(ops: Path, bundle, fleet: FleetServer, tmp_path: Path):
    v1, v2 = bundle("1.0.0"), bundle("1.1.0")
    pushed(ops, fleet.url, v1)
    fetcher = ReleaseFetcher(tmp_path / "device" / "fleet", fleet.url, root_file=metadata_dir(ops) / "1.root.json")
    assert fetcher.fetch(v1.target).read_bytes() == v1.path.read_bytes()
    pushed(ops, fleet.url, v2)
    again = ReleaseFetcher(tmp_path / "device" / "fleet", fleet.url)
    assert hashlib.sha256(again.fetch(v2.target).read_bytes()).hexdigest() == v2.sha256


def _drain(pipe: Any) -> None:
    with pipe:
        pipe.read()


def test_cloud_serve_with_data_serves_the_fleet_and_the_models(tmp_path: Path, ops: Path):
    process = subprocess.Popen([sys.executable, "-m", "edgefn", "cloud", "serve", "--data", str(tmp_path / "data"),
                                "--models", str(MODELS), "--port", "0", "--insecure", "--fleet-root", str(trusted(ops))],
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "400"})
    assert process.stderr is not None
    try:
        url = None
        for line in process.stderr:
            found = re.search(r"serving the fleet and .*digits.* on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url, f"exited with {process.poll()} before listening"
        threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
        answer = httpx.post(f"{url}{API}/devices/d0/report", json={"group": "g", "state": "idle"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["device_id"] == "d0"
        assert httpx.get(f"{url}{API}/devices", timeout=30).json()["devices"][0]["id"] == "d0"
        assert httpx.get(f"{url}/v2/models/digits", timeout=30).json()["name"] == "digits"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert (tmp_path / "data" / "fleet.sqlite").exists()


def test_cloud_serve_needs_models_or_data():
    result = CliRunner().invoke(app, ["cloud", "serve", "--port", "0"])
    assert result.exit_code != 0
    assert "--models DIR" in result.output and "--data DIR" in result.output


def test_a_database_made_before_accuracy_is_upgraded(tmp_path: Path):
    from sqlalchemy import inspect, text

    from cloud_sync.fleet.db import Database

    url = f"sqlite:///{tmp_path / 'fleet.sqlite'}"
    old = Database(url)
    with old.engine.begin() as connection:  # as an older server made it
        connection.execute(text("ALTER TABLE devices DROP COLUMN accuracy"))
    old.close()
    upgraded = Database(url)
    try:
        assert "accuracy" in {c["name"] for c in inspect(upgraded.engine).get_columns("devices")}
    finally:
        upgraded.close()
