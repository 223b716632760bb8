"""Elastic instance pools: scaling up and down, scale to zero, the device's memory budget.

Real components (the digits example), a real broker and the real daemon where events travel."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sklearn.datasets import load_digits

from edgefn.daemon import Daemon
from edgefn.events import Event
from edgefn.functions.build import component_path
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import load_manifest
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from tests.conftest import MODELS, publish

X, Y = load_digits(return_X_y=True)


def payload(k: int, prefix: str) -> bytes:
    i = 1400 + k % 397
    return json.dumps({"id": f"{prefix}-{k}", "pixels": X[i].astype(int).tolist()}).encode()


def elastic_copy(digits_fn: Path, dest: Path, limits: str, name: str = "digits") -> Path:
    """The built digits function under `dest`, its manifest's [limits] replaced by `limits`."""
    folder = dest / name
    shutil.copytree(digits_fn, folder)
    text = (folder / "edgefn.toml").read_text()
    text = re.sub(r"\[limits\][^\[]*", f"[limits]\nmemory_mb = 64\ntimeout_ms = 500\n{limits}\n\n", text)
    if name != "digits":  # another function of the same component: its own name and topics
        text = text.replace('name = "digits"', f'name = "{name}"').replace("/digits", f"/{name}")
        (folder / "build" / "digits.wasm").rename(folder / "build" / f"{name}.wasm")
    (folder / "edgefn.toml").write_text(text)
    return folder


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    registry = ModelRegistry([MODELS])
    registry.choice("digits")  # loaded now, as the daemon does: not counted in an instance's first call
    return registry


def sandbox_of(runtime: Runtime, folder: Path, registry: ModelRegistry) -> FunctionSandbox:
    manifest = load_manifest(folder)
    return FunctionSandbox(runtime, manifest, component_path(folder, manifest),
                           FunctionHost(manifest.name, registry, StateStore(":memory:")))


@pytest.fixture()
def budgeted(component_cache: Path) -> Iterator[Runtime]:
    with Runtime(component_cache, memory_budget_mb=1024) as runtime:
        yield runtime


def test_the_memory_budget_is_never_exceeded_by_two_functions_scaling_up(
        budgeted: Runtime, digits_fn: Path, registry: ModelRegistry, tmp_path: Path):
    # idle_s short: a function the budget leaves without an instance gets room as the other's idle out.
    limits = "min_instances = 0\nmax_instances = 4\nidle_s = 0.2"
    pools = [sandbox_of(budgeted, elastic_copy(digits_fn, tmp_path / str(i), limits), registry) for i in range(2)]
    try:
        for pool in pools:  # warm: each function's estimate settles on what its instances hold
            for k in range(3):
                pool.handle(Event(f"w{k}", "sensors/a/digits", payload(k, "w"), time.time() * 1000))
        for pool in pools:
            pool.keep(idle_s=0)  # back to zero: now the same functions scale up under a tight budget
        budget = budgeted.budget
        assert budget.used == 0
        each = max(pool.instance_bytes for pool in pools)
        budget.total = int(3.5 * each)  # room for three instances of the eight the functions want (bytes: peak)
        budget.peak = 0
        seen: list[int] = []
        answered: list[str] = []
        stop = threading.Event()

        least = [each]  # the smallest estimate in force: instances measured meanwhile move it

        def watch() -> None:
            while not stop.is_set():
                seen.append(sum(pool.instances for pool in pools))
                least[0] = min(least[0], *(pool.instance_bytes for pool in pools))
                assert budget.used <= budget.total
                time.sleep(0.001)

        def hammer(pool: FunctionSandbox, worker: int) -> None:
            for k in range(15):
                # An event that has waited long already: each call wants an instance of its own now.
                event = Event(f"{worker}-{k}", "sensors/a/digits", payload(k, f"h{worker}"), time.time() * 1000 - 5000)
                out = pool.handle(event)
                answered.append(json.loads(out[0].payload)["event_id"])

        watcher = threading.Thread(target=watch)
        watcher.start()
        workers = [threading.Thread(target=hammer, args=(pools[w % 2], w)) for w in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        stop.set()
        watcher.join()
        assert len(answered) == 8 * 15 and len(set(answered)) == 8 * 15  # every event waited its turn, none lost
        assert budget.peak <= budget.total, (budget.peak, budget.total)
        room = budget.total // least[0]  # 3 while the estimate holds still
        assert 1 <= max(seen) <= room, f"instances held at once: {max(seen)} (the budget has room for {room})"
        assert budget.used <= budget.total
    finally:
        for pool in pools:
            pool.close()
    assert budget.used == 0  # every instance gave its reservation back


def test_the_old_instances_key_is_a_fixed_pool(runtime: Runtime, digits_fn: Path, registry: ModelRegistry,
                                              tmp_path: Path):
    pool = sandbox_of(runtime, elastic_copy(digits_fn, tmp_path, "instances = 3\nidle_s = 0.05"), registry)
    try:
        assert (pool.min_instances, pool.max_instances, pool.instances) == (3, 3, 3)
        pool.handle(Event("a", "sensors/a/digits", payload(0, "a"), time.time() * 1000))
        time.sleep(0.4)  # many times idle_s: nothing is released below the fixed size
        assert pool.instances == 3 and pool.cold_starts == 0
    finally:
        pool.close()


def test_idle_instances_are_released_down_to_min_instances(runtime: Runtime, digits_fn: Path,
                                                           registry: ModelRegistry, tmp_path: Path):
    folder = elastic_copy(digits_fn, tmp_path, "min_instances = 1\nmax_instances = 3\nidle_s = 0.2")
    pool = sandbox_of(runtime, folder, registry)
    try:
        assert pool.instances == 1
        barrier = threading.Barrier(3)

        def one(k: int) -> None:
            barrier.wait()
            pool.handle(Event(f"b{k}", "sensors/a/digits", payload(k, "b"), time.time() * 1000 - 5000))

        threads = [threading.Thread(target=one, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        grown = pool.instances
        deadline = time.monotonic() + 5
        while pool.instances > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert grown >= 2 and pool.instances == 1
    finally:
        pool.close()


@pytest.fixture()
def elastic_daemon(broker, settings_for, digits_fn: Path, tmp_path: Path) -> Iterator:
    """elastic_daemon(limits) -> a started daemon running the digits function with these [limits]."""
    started: list[Daemon] = []

    def make(limits: str) -> Daemon:
        d = Daemon(settings_for(broker, elastic_copy(digits_fn, tmp_path, limits)))
        d.start()
        started.append(d)
        d.wait_connected(10)
        return d

    yield make
    for d in started:
        d.stop(drain_timeout=2)


@pytest.mark.broker
def test_scaled_to_zero_the_next_event_is_answered(broker, elastic_daemon, collector):
    d = elastic_daemon("min_instances = 0\nmax_instances = 2\nidle_s = 0.2")
    results = collector("results/+/digits")
    pool = d.functions[0].sandbox
    assert pool.instances == 0  # nothing held before the first event
    for round_ in range(3):
        publish(broker.port, "sensors/z/digits", [payload(round_, "z")])
        got = results.wait_for(round_ + 1, timeout=10)
        assert len(got) == round_ + 1 and got[-1][1]["event_id"] == f"z-{round_}"
        deadline = time.monotonic() + 5
        while pool.instances and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.instances == 0, "not scaled to zero after idle_s"
        assert 'edgefn_function_instances{function="digits"} 0.0' in d.metrics.render().decode()
    assert pool.cold_starts == 3
    health = d.health()
    assert health["instances"]["digits"]["min"] == 0 and health["instances"]["digits"]["cold_starts"] == 3
    assert health["memory_budget"]["used_mb"] == 0


@pytest.mark.broker
def test_no_event_is_lost_while_instances_scale_down_as_events_arrive(broker, elastic_daemon, collector):
    # idle_s about the gaps between events: instances are released while others are taken and made.
    d = elastic_daemon("min_instances = 0\nmax_instances = 2\nidle_s = 0.03")
    results = collector("results/+/digits")
    rng = random.Random(21)
    sent = 0
    for _ in range(40):
        n = rng.choice((1, 1, 2, 5))
        publish(broker.port, "sensors/s/digits", [payload(sent + k, "s") for k in range(n)])
        sent += n
        time.sleep(rng.choice((0.0, 0.02, 0.04, 0.08)))
    got = results.wait_for(sent, timeout=30)
    ids = {body["event_id"] for _, body in got if isinstance(body, dict) and "event_id" in body}
    assert ids == {f"s-{k}" for k in range(sent)}, f"lost: {sorted({f's-{k}' for k in range(sent)} - ids)}"
    assert not [t for t, _ in got if t.startswith("edgefn/errors")]
    assert d.functions[0].sandbox.cold_starts >= 5  # it did scale down (and back up) many times meanwhile


def test_status_shows_each_functions_instances(tmp_path: Path):
    from edgefn.cli.run import _instance_rows

    rows = _instance_rows({"instances": {"digits": {"instances": 1, "idle": 1, "min": 0, "max": 4,
                                                    "instance_mb": 1.4, "cold_starts": 7}},
                           "memory_budget": {"budget_mb": 256, "used_mb": 1.4, "peak_mb": 5.6}})
    assert ("instances", "digits: 1 (1 idle; 0..4, ~1.4 MiB each, 7 cold starts)") in rows
    assert ("memory budget", "1.4 of 256 MiB held by instances (peak 5.6)") in rows
