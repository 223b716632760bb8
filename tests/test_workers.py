"""Functions in worker processes (edgefn.dispatch.processes): they answer, a killed worker loses nothing,
state has one owner, an ordered function keeps its order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from edgefn.dispatch.processes import RemoteSandbox
from edgefn.functions.build import build
from tests.conftest import eventually, publish
from tests.test_daemon import digit_payloads


def _processes(d):
    sandbox = d.functions[0].sandbox
    assert isinstance(sandbox, RemoteSandbox), "the function runs in the daemon's own process"
    return sandbox._processes


def test_functions_run_in_worker_processes(broker, settings_for, started, collector, digits_fn):
    results = collector("results/+/digits")
    d = started(settings_for(broker, digits_fn, workers=2))
    pids = _processes(d).pids()
    assert len(pids) == 2 and os.getpid() not in pids
    payloads, labels = digit_payloads(60, "w")
    publish(broker.port, "sensors/dev1/digits", payloads)
    got = results.wait_for(60, timeout=60)
    assert sorted(m["event_id"] for _, m in got) == sorted(labels)
    # What the guests cost was measured in the workers and booked here.
    assert eventually(lambda: d.usage()["digits"]["invocations"] == 60, 5)
    assert d.health()["instances"]["digits"]["workers"] == 2


def test_a_killed_worker_is_started_again_and_nothing_is_lost(broker, settings_for, started, collector, digits_fn):
    results = collector("results/+/digits")
    d = started(settings_for(broker, digits_fn, workers=1))
    processes = _processes(d)
    payloads, labels = digit_payloads(400, "kill")
    publish(broker.port, "sensors/dev1/digits", payloads[:200])
    assert eventually(lambda: len(results.messages) >= 20, 60)
    os.kill(processes.pids()[0], signal.SIGKILL)  # mid-stream: a batch may be running there
    publish(broker.port, "sensors/dev1/digits", payloads[200:])
    got = results.wait_for(400, timeout=120)
    assert set(labels) <= {m["event_id"] for _, m in got}, "an event was lost with its worker"
    assert processes.restarts >= 1 and d.health()["instances"]["digits"]["worker_restarts"] >= 1


@pytest.fixture(scope="module")
def counter_fn(tmp_path_factory: pytest.TempPathFactory, hostile_fn):
    """The hostile guest as a function that may run on two instances (its `count` keeps state)."""
    dest = tmp_path_factory.mktemp("fn") / "hostile"
    shutil.copytree(hostile_fn, dest)
    toml = dest / "edgefn.toml"
    toml.write_text(toml.read_text().replace("instances = 1", "instances = 2"))
    build(dest)
    return dest


def test_state_has_one_owner_and_an_ordered_function_its_order(broker, settings_for, started, collector, counter_fn):
    """A function that sets state keeps order by default: its counter counts 1..N in arrival order, on
    whichever worker, and the daemon's store holds the count (a worker killed between batches too)."""
    results = collector("results/+/hostile")
    d = started(settings_for(broker, counter_fn, workers=2))
    processes = _processes(d)
    assert d.functions[0].local.workers == 1, "a function that sets state is ordered by default"
    publish(broker.port, "sensors/dev1/hostile", [b"count"] * 30)
    results.wait_for(30, timeout=60)
    os.kill(processes.pids()[processes.pin("hostile")], signal.SIGKILL)
    time.sleep(0.2)
    publish(broker.port, "sensors/dev1/hostile", [b"count"] * 30)
    got = results.wait_for(60, timeout=120)
    assert [int(m) for _, m in got] == list(range(1, 61))
    assert d.state.get("hostile", "n") == b"60"


def test_an_unordered_function_spreads_over_every_worker(broker, settings_for, started, collector, counter_fn,
                                                           tmp_path):
    dest = tmp_path / "spread"
    shutil.copytree(counter_fn, dest)
    toml = dest / "edgefn.toml"
    toml.write_text(toml.read_text().replace("[trigger]", "[trigger]\nordered = false"))
    results = collector("results/+/hostile")
    d = started(settings_for(broker, dest, workers=2))
    assert d.functions[0].local.workers == 4, "its instances in each worker"
    publish(broker.port, "sensors/dev1/hostile", [b"ok"] * 200)
    results.wait_for(200, timeout=60)
    assert all("hostile" in w.ran for w in _processes(d)._workers), "a worker ran none of its batches"


def test_a_state_limit_is_the_guests_error_in_a_worker(broker, settings_for, started, collector, counter_fn):
    errors = collector("edgefn/errors/hostile")
    started(settings_for(broker, counter_fn, workers=1))
    publish(broker.port, "sensors/dev1/hostile", [b"bigstate"])
    (_, body), = errors.wait_for(1, timeout=30)
    assert body["reason"] == "trap" and "64 KiB" in json.dumps(body)
