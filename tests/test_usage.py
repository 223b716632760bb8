"""Usage metering (edgefn.observe.usage) on a real daemon: the digits function, real mosquitto, real
model; /metrics, `edgefn status` and the switch that turns metering off. The sandbox's linear memory
reading (edgefn.functions.memory) on real guest instances."""

from __future__ import annotations

import gc
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.daemon import Daemon
from edgefn.events import Event
from edgefn.functions.build import component_path
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import load_manifest
from edgefn.functions.memory import sizes
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from edgefn.observe.usage import Usage
from tests.conftest import MODELS, publish
from tests.test_daemon import digit_payloads

MIB = 1 << 20


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the daemon's /metrics: (name, sorted labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_answered(daemon: Daemon, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        handled = sum(v for (name, _), v in samples(daemon.observe.port).items()
                      if name == "edgefn_events_handled_total")
        if handled >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"only {handled} of {count} events handled")


@pytest.mark.broker
def test_metrics_count_each_functions_usage(broker, settings_for, digits_fn: Path, collector):
    results = collector("results/+/digits", "edgefn/errors/digits")
    daemon = Daemon(settings_for(broker, digits_fn, metrics_port=0))
    daemon.start()
    try:
        daemon.wait_connected(10)
        payloads, _ = digit_payloads(60, "usage")
        bad = [b"not json", b'{"pixels": [1, 2]}']  # the guest's own errors: invoked all the same
        publish(broker.port, "sensors/dev1/digits", payloads + bad)
        results.wait_for(62)
        wait_answered(daemon, 62)
        port = daemon.observe.port
        got = samples(port)

        def value(name: str, **labels: str) -> float:
            return got[(name, tuple(sorted({"function": "digits", **labels}.items())))]

        assert value("edgefn_function_invocations_total") == 62
        assert value("edgefn_function_bytes_total", direction="in") == sum(len(p) for p in payloads + bad)
        outputs = [json.dumps(body) for topic, body in results.messages if topic.startswith("results/")]
        assert len(outputs) == 60
        # What the guest published (compact JSON); the daemon's error messages are not the function's output.
        assert value("edgefn_function_bytes_total", direction="out") > 60 * 50
        assert 0 < value("edgefn_function_guest_cpu_seconds_total") < time.process_time()
        assert 1 * MIB < value("edgefn_function_peak_memory_bytes") <= load_manifest(digits_fn).limits.memory_mb * MIB
        # Every infer call the guest made is one the model's batcher served: counted twice, independently.
        served = sum(v for (name, labels), v in got.items()
                     if name == "edgefn_inference_batch_calls_sum" and ("where", "local") in labels)
        assert value("edgefn_function_infer_calls_total", where="local") == served > 0
        assert value("edgefn_function_infer_seconds_total", where="local") > 0
        assert value("edgefn_function_infer_calls_total", where="cloud") == 0

        usage = daemon.health()["usage"]["digits"]
        assert usage["invocations"] == 62 and usage["infer_local_calls"] == served
        shown = CliRunner(env={"COLUMNS": "240"}).invoke(app, ["status", "--port", str(port)])
        assert "usage since start" in shown.output, shown.output
        row = next(line for line in shown.output.splitlines() if "digits" in line and "calls" in line)
        assert re.search(r"\b62\b", row) and f"{int(served)} calls" in row
    finally:
        daemon.stop()


@pytest.mark.broker
def test_metering_off_meters_nothing(broker, settings_for, digits_fn: Path, collector):
    results = collector("results/+/digits")
    daemon = Daemon(settings_for(broker, digits_fn, metrics_port=0, metering=False))
    daemon.start()
    try:
        daemon.wait_connected(10)
        publish(broker.port, "sensors/dev1/digits", digit_payloads(10, "off")[0])
        results.wait_for(10)
        wait_answered(daemon, 10)
        metered = [key for key in samples(daemon.observe.port) if key[0].startswith("edgefn_function_")
                   and key[0] != "edgefn_function_instances"]  # the pool's size is not usage
        assert not metered
        assert daemon.health()["usage"] == {}
    finally:
        daemon.stop()


def test_guest_cpu_leaves_out_the_cpu_spent_in_infer():
    usage = Usage()
    event = Event("e1", "sensors/a/b", b"12345", 0.0)
    call = usage.call("f", [event])
    usage.inferred("f", "local", 0.5, 0.2)  # as FunctionHost.infer books a call on this thread
    deadline = time.thread_time() + 0.3
    while time.thread_time() < deadline:  # 0.3 s of CPU on this thread, 0.2 s of it "in infer"
        pass
    call.done([[]])
    f = usage.snapshot()["f"]
    assert 0.05 < f.guest_cpu_s < 0.2, f.guest_cpu_s
    assert (f.invocations, f.bytes_in, f.infer_calls["local"], f.infer_s["local"]) == (1, 5, 1, 0.5)


def _sandbox(runtime: Runtime, folder: Path) -> FunctionSandbox:
    manifest = load_manifest(folder)
    return FunctionSandbox(runtime, manifest, component_path(folder, manifest),
                           FunctionHost(manifest.name, ModelRegistry([MODELS]), StateStore(":memory:")))


def test_a_sandbox_reads_the_linear_memory_of_its_live_instances(runtime: Runtime, hostile_fn: Path):
    manifest = load_manifest(hostile_fn)
    sandbox = _sandbox(runtime, hostile_fn)
    try:
        limit = manifest.limits.memory_mb * MIB
        first = sandbox.memory_bytes()
        assert 1 * MIB < first <= limit
        (inst,) = list(sandbox._made.values())
        assert inst.memories and sizes([inst.memories]) == [first]
        old = id(inst)
        del inst  # the sandbox's references only, from here on
        answer = sandbox.handle_batch([Event("a", "sensors/d/hostile", b"alloc", 0.0)])[0]
        assert "memory" in str(answer)  # it ran into its limit, and its instance was thrown away
        assert list(sandbox._made) != [old], "the dead instance is no longer counted"
        assert 1 * MIB < sandbox.memory_bytes() < limit
    finally:
        sandbox.close()


def test_a_watched_instance_is_read_after_unwatched_ones_came_and_went(runtime: Runtime, component_cache: Path,
                                                                         hostile_fn: Path):
    """A daemon with metering off and one with it on in the same process (the tests do this): an unwatched
    instance's memory is freed and the kernel gives its addresses to the next memory made; that memory must
    still be read as the new instance's. And a live unwatched instance's memory is not counted as its."""
    manifest = load_manifest(hostile_fn)

    first = _sandbox(runtime, hostile_fn)
    (inst,) = list(first._made.values())
    memories = len(inst.memories)  # how many linear memories one instance of this component has
    del inst
    first.close()
    with Runtime(component_cache, watch_memory=False) as quiet:
        gone = _sandbox(quiet, hostile_fn)
        assert gone.memory_bytes() == 0  # not watched: not read
        gone.close()
        del gone
        gc.collect()  # its store freed: its reservation's addresses are free for the next memory
        alive = _sandbox(quiet, hostile_fn)
        sandbox = _sandbox(runtime, hostile_fn)
        try:
            assert 1 * MIB < sandbox.memory_bytes() <= manifest.limits.memory_mb * MIB
            (inst,) = list(sandbox._made.values())
            assert len(inst.memories) == memories
        finally:
            sandbox.close()
            alive.close()
