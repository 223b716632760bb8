"""The fleet server's audit trail (cloud_sync.fleet.audit) and the usage devices report, on SQLite and on a
real PostgreSQL: every operator action, refused ones too, with who did it; entries that neither the API nor
the database lets anyone change; `edgefn fleet audit`, `edgefn fleet usage` and the page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from cloud_sync.fleet.server import FleetServer, start_fleet_server
from edgefn.cli.main import app
from edgefn.fleet.pack import BundleInfo, build_bundle
from edgefn.fleet.signing import metadata_dir
from edgefn.protocol.fleet import API
from tests.pg import new_database, postgres  # noqa: F401 (postgres: the session's server, a fixture)

runner = CliRunner(env={"COLUMNS": "240"})
TOKEN = "operator-s3cret"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def bundle(tiny_fn: Path, tmp_path: Path) -> BundleInfo:
    return build_bundle([tiny_fn], "tiny", "1.0.0", tmp_path / "out" / "tiny-1.0.0.tar", models=[])


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else new_database(request.getfixturevalue("postgres"))


def serve(tmp_path: Path, ops: Path, db_url: str | None, **options: Any) -> FleetServer:
    return start_fleet_server(tmp_path / "data", db_url=db_url, step_s=0,
                              fleet_root=metadata_dir(ops) / "1.root.json", **options)


@pytest.fixture()
def fleet(tmp_path: Path, ops: Path, db_url: str | None) -> Iterator[FleetServer]:
    with serve(tmp_path, ops, db_url, token=TOKEN) as server:
        yield server


@pytest.fixture()
def client(fleet: FleetServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url + API, timeout=30) as c:
        yield c


def audit(client: httpx.Client) -> list[dict[str, Any]]:
    answer = client.get("/audit")
    assert answer.status_code == 200, answer.text
    return answer.json()["entries"]


def test_every_operator_action_is_audited_with_who_and_its_result(ops: Path, bundle: BundleInfo, fleet: FleetServer,
                                                                  client: httpx.Client):
    pushed = runner.invoke(app, ["fleet", "push", str(bundle.path), "--keys", str(ops), "--server", fleet.url],
                           env={"EDGEFN_FLEET_TOKEN": TOKEN})
    assert pushed.exit_code == 0, pushed.output
    enrolled = client.post("/enrollments", json={"device_id": "d1", "group": "lab"}, headers=OPERATOR)
    device_token = enrolled.json()["token"]
    assert client.post("/devices/d1/report", json={"group": "lab", "state": "idle"},
                       headers={"Authorization": f"Bearer {device_token}"}).status_code == 200
    request = {"bundle": "tiny", "version": "1.0.0", "group": "lab", "canary": 1}
    assert client.post("/rollouts", json=request).status_code == 401  # no credential
    assert client.post("/rollouts", json=request, headers={"Authorization": "Bearer guess"}).status_code == 401
    assert client.post("/rollouts", json={**request, "group": "empty"}, headers=OPERATOR).status_code == 400
    rollout = client.post("/rollouts", json=request, headers=OPERATOR).json()["id"]
    for action, status in (("pause", 200), ("resume", 200), ("abort", 200), ("resume", 409)):
        assert client.post(f"/rollouts/{rollout}/{action}", headers=OPERATOR).status_code == status
    assert client.post("/enrollments/d1/revoke", headers=OPERATOR).status_code == 200
    assert client.delete("/devices/d1", headers=OPERATOR).status_code == 200
    assert client.delete("/devices/d1", headers=OPERATOR).status_code == 404
    assert client.delete("/devices/d1").status_code == 401

    entries = audit(client)
    seen = [(e["action"], e["who"], e["status"]) for e in entries]
    assert seen[1:] == [  # the first entries: the push's metadata and bundle
        ("device.enroll", "operator", 201),
        ("rollout.create", "unauthenticated", 401),
        ("rollout.create", f"unknown {__import__('hashlib').sha256(b'guess').hexdigest()[:12]}", 401),
        ("rollout.create", "operator", 400),
        ("rollout.create", "operator", 201),
        ("rollout.pause", "operator", 200),
        ("rollout.resume", "operator", 200),
        ("rollout.abort", "operator", 200),
        ("rollout.resume", "operator", 409),
        ("device.revoke", "operator", 200),
        ("device.remove", "operator", 200),
        ("device.remove", "operator", 404),
        ("device.remove", "unauthenticated", 401),
    ], seen
    assert seen[0] == ("publish", "operator", 200)
    publish = entries[0]
    assert publish["arguments"]["bundle"] == bundle.path.name and "published tiny 1.0.0" in publish["result"]
    assert entries[1]["arguments"] == {"device_id": "d1", "group": "lab"}
    assert device_token not in json.dumps(entries), "a credential never enters the trail"
    created = entries[5]
    assert created["arguments"]["bundle"] == "tiny" and created["arguments"]["canary"] == 1
    assert created["result"] == f"rollout {rollout}: tiny 1.0.0 to lab"
    assert "bearer token" in entries[2]["result"] and "no devices" in entries[4]["result"].lower()
    assert entries[9]["arguments"] == {"id": str(rollout)} and "aborted" in entries[9]["result"]
    assert entries[12]["arguments"] == {"id": "d1"} and entries[12]["result"] == "no device 'd1'"
    assert all(e["at"] > 0 for e in entries) and [e["id"] for e in entries] == sorted(e["id"] for e in entries)

    listed = runner.invoke(app, ["fleet", "audit", "--server", fleet.url, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)["entries"] == entries
    table = runner.invoke(app, ["fleet", "audit", "--server", fleet.url])
    assert "rollout.resume" in table.output and "409" in table.output and "unauthenticated" in table.output
    page = httpx.get(fleet.url + "/", timeout=30).text
    assert 'id="audit"' in page and f'id="audit-{entries[-1]["id"]}" class="audit refused"' in page


def test_a_secret_in_the_arguments_is_redacted(fleet: FleetServer, client: httpx.Client):
    client.post("/rollouts", json={"bundle": "tiny", "version": "1.0.0", "group": "lab", "token": "t0p-secret",
                                   "nested": {"password": "hunter2"}}, headers=OPERATOR)
    (entry,) = audit(client)
    assert entry["arguments"]["token"] == "[redacted]" and entry["arguments"]["nested"] == {"password": "[redacted]"}
    assert "t0p-secret" not in json.dumps(entry) and "hunter2" not in json.dumps(entry)


def test_an_open_server_records_anonymous(tmp_path: Path, ops: Path, db_url: str | None):
    with serve(tmp_path, ops, db_url, insecure=True) as server, httpx.Client(base_url=server.url + API) as c:
        assert c.post("/enrollments", json={"device_id": "d2", "group": "lab"}).status_code == 201
        (entry,) = audit(c)
        assert (entry["who"], entry["action"], entry["status"]) == ("anonymous", "device.enroll", 201)


def test_no_one_can_change_or_delete_an_entry(fleet: FleetServer, client: httpx.Client):
    assert client.post("/enrollments", json={"device_id": "d3", "group": "lab"}, headers=OPERATOR).status_code == 201
    before = audit(client)
    entry = before[0]["id"]
    for method in ("PUT", "PATCH", "DELETE"):
        for path in ("/audit", f"/audit/{entry}"):
            answer = client.request(method, path, json={"who": "nobody"}, headers=OPERATOR)
            assert answer.status_code in (404, 405), (method, path, answer.status_code)
    assert audit(client) == before
    # Not through the API, and not by a stray statement either: the database refuses.
    for statement in ("UPDATE audit SET who = 'nobody'", "DELETE FROM audit"):
        with pytest.raises(DBAPIError, match="append-only"), fleet.service.db.transaction() as session:
            session.execute(text(statement))
    if fleet.service.db.dialect == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), fleet.service.db.transaction() as session:
            session.execute(text("TRUNCATE audit"))
    assert audit(client) == before


def test_a_device_reports_its_usage_and_the_page_shows_its_bill(fleet: FleetServer, client: httpx.Client):
    enrolled = client.post("/enrollments", json={"device_id": "pi-7", "group": "lab"}, headers=OPERATOR).json()
    usage = {"digits": {"invocations": 1200, "guest_cpu_s": 1.5, "peak_memory_bytes": 13 << 20,
                        "infer_local_calls": 300, "infer_local_s": 0.25, "infer_cloud_calls": 4,
                        "infer_cloud_s": 0.5, "bytes_in": 900_000, "bytes_out": 120_000}}
    answer = client.post("/devices/pi-7/report", json={"group": "lab", "state": "idle", "usage": usage},
                         headers={"Authorization": f"Bearer {enrolled['token']}"})
    assert answer.status_code == 200, answer.text
    (device,) = client.get("/devices").json()["devices"]
    assert device["usage"] == usage
    shown = runner.invoke(app, ["fleet", "usage", "--server", fleet.url, "--json"])
    assert json.loads(shown.output) == {"usage": {"pi-7": usage}}
    table = runner.invoke(app, ["fleet", "usage", "--server", fleet.url])
    assert "pi-7" in table.output and "1200" in table.output and "13.0 MiB" in table.output
    page = httpx.get(fleet.url + "/", timeout=30).text
    row = page.split('id="usage-pi-7-digits"', 1)[1].split("</tr>", 1)[0]
    assert "1200" in row and "1.500 s" in row and "4 calls, 0.500 s" in row and "878.9 KiB" in row


@pytest.mark.parametrize("usage", [
    {"digits": {"invocations": -1}},
    {"digits": {"guest_cpu_s": float("inf")}},
    {"bad name!": {}},
    {f"f{i}": {} for i in range(65)},
])
def test_impossible_usage_is_refused(client: httpx.Client, usage: dict[str, Any]):
    enrolled = client.post("/enrollments", json={"device_id": "liar", "group": "lab"}, headers=OPERATOR).json()
    answer = client.post("/devices/liar/report", content=json.dumps({"group": "lab", "state": "idle",
                                                                     "usage": usage}).replace("Infinity", "1e999"),
                         headers={"Authorization": f"Bearer {enrolled['token']}", "Content-Type": "application/json"})
    assert answer.status_code in (400, 422), answer.text
