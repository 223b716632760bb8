"""Loops are cut: a function that hears its own outputs runs a bounded number of times (edgefn-hop)."""

from __future__ import annotations

import logging
import shutil
import time

import pytest

from tests.conftest import eventually, publish

pytestmark = pytest.mark.broker


@pytest.fixture()
def echoing_fn(hostile_fn, tmp_path):
    """The hostile guest triggered on every topic: it hears its results and its errors (each of which it
    answers with an error: its payload names no misdeed)."""
    folder = tmp_path / "hostile"
    shutil.copytree(hostile_fn, folder)
    manifest = (folder / "edgefn.toml").read_text().replace('topics = ["sensors/+/hostile"]', 'topics = ["#"]', 1)
    (folder / "edgefn.toml").write_text(manifest)
    (folder / "build" / "hostile.wasm").touch()  # newer than its sources
    return folder


def test_a_function_that_hears_its_own_outputs_stops_at_the_hop_limit(broker, settings_for, started, echoing_fn,
                                                                      collector, caplog):
    results, errors = collector("results/#"), collector("edgefn/errors/#")
    with caplog.at_level(logging.WARNING, logger="edgefn.daemon"):
        d = started(settings_for(broker, echoing_fn))  # max_hops: the default, 8
    [warning] = [r.getMessage() for r in caplog.records if "triggered by what it publishes" in r.getMessage()]
    assert "trigger # takes results/+/hostile" in warning and "trigger # takes edgefn/errors/hostile" in warning
    publish(broker.port, "sensors/dev1/hostile", [b"ok"])
    assert eventually(lambda: any(doc.get("reason") == "loop" for _, doc in errors.messages), 10), \
        f"no loop error; {len(errors.messages)} errors so far"
    time.sleep(1.5)  # nothing more comes: the loop's own error is answered with nothing
    assert [(t, p.split(b":")[0]) for t, p in results.messages] == [("results/dev1/hostile", b"ok")]
    assert results.properties[0]["edgefn-hop"] == "1"
    reasons = [doc["reason"] for _, doc in errors.messages]
    assert reasons == ["guest-error"] * 7 + ["loop"]  # hops 2 to 8, then the event at hop 8 is not run
    assert [p["edgefn-hop"] for p in errors.properties] == [str(h) for h in range(2, 10)]
    loop = errors.messages[-1][1]
    assert loop["function"] == "hostile" and "max_hops is 8" in loop["error"]
    assert d.metrics.events_handled.labels("hostile", "loop")._value.get() == 2  # the loop error came back once
    assert eventually(lambda: d.ingress.outstanding == 0, 5), "every event answered and settled"
