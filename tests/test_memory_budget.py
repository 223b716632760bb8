"""The device's memory budget counts each instance for what it adds, so that many small functions fit.

Real components (copies of the digits example), a real broker and the real daemon."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sklearn.datasets import load_digits

from edgefn.functions.build import component_path
from edgefn.functions.manifest import load_manifest
from edgefn.functions.sandbox import Runtime
from tests.conftest import digits_copies, eventually

X, _ = load_digits(return_X_y=True)


def publish_interleaved(port: int, events: list[tuple[str, bytes]]) -> None:
    """Publish at QoS1 from one client, in this order (the functions' events interleaved: their first calls run
    at once), and wait until the broker has acknowledged every one."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sensor-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for info in [client.publish(topic, payload, qos=1) for topic, payload in events]:
            info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.broker
@pytest.mark.parametrize(("n", "budget_mb", "burst"), [(20, 120, 10), (50, None, 20)], ids=["20-in-120MiB", "50-default"])
def test_many_copies_of_a_function_all_answer_within_a_budget_their_instances_fit(
        broker, started, settings_for, collector, digits_fn: Path, tmp_path: Path, n: int, budget_mb: int | None,
        burst: int):
    """Functions of two instances each: about 1.4 MiB an instance here (what instantiating adds and what its first
    call writes to its linear memory). Counted by the process's memory growth over each first call, the instances'
    first calls running at once counted each other's (and the host's) growth, 5 to 30 MiB an instance: instances
    were dropped for want of room, and functions left without one never answered. 20 functions in 120 MiB (a
    device with this much for instances), and 50 within the device profile's own budget (the generic x86-64
    profile's 1 GiB: the old count held 740 to 1,020 MiB of it, and at times left functions without an instance)."""
    functions, models = digits_copies(digits_fn, tmp_path, n)
    daemon = started(settings_for(broker, functions, models=[models]))
    budget = daemon.runtime.budget
    assert budget.total is not None, "every shipped profile gives instances a memory budget"
    if budget_mb is not None:
        budget.total = budget_mb << 20
    results = collector("results/#", "edgefn/errors/#")
    for round_, per_function in enumerate((burst, 1)):  # a burst to every function at once, then one event each
        events = [(f"sensors/a/d{i}", json.dumps({"id": f"{round_}-{k}-{i}", "pixels": X[k].astype(int).tolist()})
                   .encode()) for k in range(per_function) for i in range(n)]
        expected = len(results.messages) + len(events)
        publish_interleaved(broker.port, events)
        got = results.wait_for(expected, timeout=60)
        answered = {body["event_id"] for _, body in got if isinstance(body, dict)}
        waiting = sorted({topic.split("/")[-1] for topic, payload in events
                          if json.loads(payload)["id"] not in answered})
        assert len(got) == expected, (f"round {round_}: {len(got) - expected + len(events)} of {len(events)} "
                                      f"answered; functions with events waiting: {waiting}; {budget.snapshot()}")
        assert all(topic.startswith("results/") for topic, _ in got), [b for t, b in got if t.startswith("edgefn")]
    # Every function keeps its instances, each counted for about what it holds, and the budget holds.
    assert eventually(lambda: all(f.sandbox.instances == 2 for f in daemon.functions), 5), \
        {f.manifest.name: f.sandbox.instances for f in daemon.functions}
    assert budget.peak <= budget.total
    each = [f.sandbox.instance_bytes for f in daemon.functions]
    assert max(each) <= 3 << 20, [round(b / 2**20, 1) for b in each]


def _mapped_artifacts() -> int:
    """The mappings of compiled components (the cache's artifacts) in this process."""
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip().endswith(".cwasm") for line in maps)


def test_copies_of_a_component_are_loaded_once(runtime: Runtime, digits_fn: Path, tmp_path: Path):
    """Functions built from the same bytes share the loaded component: loaded once per function, its compiled
    code was mapped once each (about 20 MiB of RSS per digits function, the same pages in the page cache)."""
    functions, _ = digits_copies(digits_fn, tmp_path, 2)
    first, second = (component_path(f, load_manifest(f)) for f in sorted(functions.iterdir()))
    loaded = runtime.load(first)
    before = _mapped_artifacts()
    again = runtime.load(second)
    assert _mapped_artifacts() == before
    assert again is loaded
