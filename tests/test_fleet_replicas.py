"""Several fleet servers over one PostgreSQL database and one shared data folder: `edgefn cloud serve`
twice, as replicas behind a load balancer would run. Rollout changes are kept apart by the database, not
by a lock of one process: concurrent creates for one group make exactly one rollout, and devices split
between the replicas all update."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.fleet.pack import build_bundle
from edgefn.fleet.signing import init_keys, init_operator_token, metadata_dir
from edgefn.protocol.fleet import API
from tests.pg import new_database, postgres  # noqa: F401 (postgres: the session's server, a fixture)


def _drain(pipe: Any) -> None:
    with pipe:
        for _ in pipe:
            pass


def _serve(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", "edgefn", "cloud", "serve", *args], stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "COLUMNS": "400"})
    assert process.stderr is not None
    url = next((m.group(1) for line in process.stderr if (m := re.search(r"serving the fleet on (\S+)", line))), None)
    assert url, f"a replica exited with {process.poll()} before listening"
    threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
    return process, url


def test_two_replicas_on_one_postgresql_make_one_rollout_and_update_every_device(
        postgres: str, tiny_fn: Path, tmp_path: Path):  # noqa: F811
    ops = tmp_path / "ops"
    init_keys(ops)
    token = init_operator_token(ops).read_text().strip()
    operator = {"Authorization": f"Bearer {token}"}
    options = ["--data", str(tmp_path / "shared"), "--db", new_database(postgres), "--port", "0", "--step-s", "0.1",
               "--fleet-root", str(metadata_dir(ops) / "1.root.json"), "--token-file", str(ops / "operator.token")]
    replicas = []
    try:
        replicas.append(_serve(options))  # one after the other: the first makes the tables
        replicas.append(_serve(options))
        (_, a), (_, b) = replicas
        info = build_bundle([tiny_fn], "tiny", "1.0.0", tmp_path / "tiny-1.0.0.tar", models=[])
        pushed = CliRunner().invoke(app, ["fleet", "push", str(info.path), "--keys", str(ops), "--server", a],
                                    env={"EDGEFN_FLEET_TOKEN": token})
        assert pushed.exit_code == 0, pushed.output
        devices: dict[str, tuple[str, dict[str, str]]] = {}  # id -> (its replica, its credential)
        for n in range(6):
            answer = httpx.post(f"{a}{API}/enrollments", json={"device_id": f"d{n}", "group": "g"}, headers=operator)
            devices[f"d{n}"] = ((a, b)[n % 2], {"Authorization": f"Bearer {answer.json()['token']}"})

        def report(device: str, **fields: Any) -> dict[str, Any]:
            server, credential = devices[device]
            answer = httpx.post(f"{server}{API}/devices/{device}/report", headers=credential, timeout=30,
                                json={"group": "g", "state": "idle", **fields})
            assert answer.status_code == 200, answer.text
            return answer.json()

        for device in devices:
            report(device)

        gate = threading.Barrier(8)
        statuses: list[int] = []

        def create(server: str) -> None:
            gate.wait()
            answer = httpx.post(f"{server}{API}/rollouts", headers=operator, timeout=30,
                                json={"bundle": "tiny", "version": "1.0.0", "group": "g", "canary": 1,
                                      "waves": [50, 100], "soak_s": 0})
            statuses.append(answer.status_code)

        threads = [threading.Thread(target=create, args=((a, b)[i % 2],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert Counter(statuses) == {201: 1, 409: 7}, statuses
        assert len(httpx.get(f"{b}{API}/rollouts").json()["rollouts"]) == 1

        deadline = time.monotonic() + 60  # each device installs what its own replica tells it
        while time.monotonic() < deadline:
            for device in devices:
                wanted = report(device)
                if wanted["version"]:
                    report(device, state="active", bundle="tiny", version=wanted["version"],
                           rollout=wanted["rollout"])
            rollout = httpx.get(f"{a}{API}/rollouts").json()["rollouts"][0]
            if rollout["state"] == "done":
                break
            time.sleep(0.2)
        assert rollout["state"] == "done", rollout
        seen = httpx.get(f"{b}{API}/devices").json()["devices"]
        assert sorted((d["id"], d["state"], d["version"]) for d in seen) == [
            (d, "active", "1.0.0") for d in sorted(devices)]
    finally:
        for process, _ in replicas:
            process.send_signal(signal.SIGTERM)
        for process, _ in replicas:
            assert process.wait(30) == 0
