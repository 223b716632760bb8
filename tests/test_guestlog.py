"""A guest's log is bounded (edgefn/observe/guestlog.py): lines and bytes a second, the excess counted."""

from __future__ import annotations

import logging
import time

from edgefn.events import Event
from edgefn.functions.build import component_path
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import load_manifest
from edgefn.functions.sandbox import FunctionSandbox
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from edgefn.observe.guestlog import GuestLog
from edgefn.observe.metrics import Metrics
from tests.conftest import MODELS


def _dropped(metrics: Metrics, function: str) -> tuple[float | None, float | None]:
    value = metrics.registry.get_sample_value
    return (value("edgefn_guest_log_dropped_lines_total", {"function": function}),
            value("edgefn_guest_log_dropped_bytes_total", {"function": function}))


def test_a_guest_that_logs_in_a_loop_writes_at_most_its_bound(runtime, hostile_fn, caplog):
    metrics = Metrics()
    manifest = load_manifest(hostile_fn)  # the default bound: 100 lines, 64 KiB a second
    host = FunctionHost(manifest.name, ModelRegistry([MODELS]), StateStore(":memory:"), metrics=metrics)
    sandbox = FunctionSandbox(runtime, manifest, component_path(hostile_fn, manifest), host)
    try:
        with caplog.at_level(logging.INFO):
            started = time.monotonic()
            [result] = sandbox.handle(Event("1", "sensors/dev1/hostile", b"logflood", time.time() * 1000))
            took = time.monotonic() - started
    finally:
        sandbox.close()
    assert result.payload == b"ok:1"  # the event itself is served
    written = [r.getMessage() for r in caplog.records if r.name == "edgefn.fn.hostile"]
    nbytes = sum(len(line.encode()) for line in written)
    assert nbytes <= 64 * 1024 * (1 + took), f"{nbytes} bytes in {took:.2f} s"
    assert len(written) <= 100 * (1 + took)
    assert written and all(len(line) == 4000 for line in written)
    assert _dropped(metrics, "hostile") == (1000 - len(written), 4000 * (1000 - len(written)))
    [said] = [r.getMessage() for r in caplog.records if "its log is over its bound" in r.getMessage()]
    assert said.startswith("hostile: ") and r"100 lines, 65536 bytes a second" in said


def test_the_bound_refills_and_the_excess_is_said_once_a_minute(caplog):
    now = [0.0]
    metrics = Metrics()
    guest = GuestLog("chatty", lines_per_s=10, bytes_per_s=16_384, metrics=metrics, clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        for n in range(50):
            guest.write(20, f"line {n}")
        now[0] = 0.5  # half a second: five lines' worth again
        for n in range(50, 60):
            guest.write(25, f"line {n}")  # a level the guest made up: info
        guest.write(20, "x" * 10_000)  # cut at 4,096 characters; the bucket is empty: dropped
        now[0] = 61.0
        guest.write(20, "y" * 20_000)  # a second's worth again: 16,384 bytes, of which this line (cut) takes 4,096
        for _ in range(4):
            guest.write(20, "z" * 4096)  # three more fit
    written = [r.getMessage() for r in caplog.records if r.name == "edgefn.fn.chatty"]
    assert written == [f"line {n}" for n in (*range(10), *range(50, 55))] + ["y" * 4096] + ["z" * 4096] * 3
    assert {r.levelno for r in caplog.records if r.name == "edgefn.fn.chatty"} == {20}
    dropped_bytes = 40 * 7 + 5 * 7 + 4096 + 4096  # "line 10".."line 49", "line 55".."line 59", the cut line, a z
    assert (guest.dropped_lines, guest.dropped_bytes) == (47, dropped_bytes)
    assert _dropped(metrics, "chatty") == (47, dropped_bytes)
    said = [r.getMessage().split(": ", 2)[2] for r in caplog.records if r.name == "edgefn.sandbox"]
    assert said == ["dropped 1 of its lines (7 bytes) since the last such line",  # the first at once
                    "dropped 46 of its lines (8500 bytes) since the last such line"]  # then a minute later
