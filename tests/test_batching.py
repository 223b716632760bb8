"""Micro-batching: concurrent infer calls stacked into one run give each caller what it would get alone."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from cloud_sync.serve import OipEndpoint, start_server
from edgefn.config import load_settings
from edgefn.daemon import Daemon
from edgefn.errors import CloudUnavailable, ConfigError, ModelError
from edgefn.inference.batching import Batcher, Coalescer, signature, split, stack
from edgefn.inference.delegates import DEFAULT_CHAINS
from edgefn.inference.registry import ModelRegistry
from edgefn.inference.tensors import WireTensor, from_wire, to_wire
from edgefn.offload.breaker import CircuitBreaker
from edgefn.offload.client import CloudClient
from tests.conftest import MODELS, publish
from tests.test_daemon import X, digit_payloads

THREADS = 8


def images(start: int, rows: int) -> WireTensor:
    return to_wire(X[start:start + rows].astype(np.float32))


class Busy:
    """A call big enough to hold the only runner for about `seconds`, as a saturated device would:
    the calls released meanwhile find no runner free and meet in one batch."""

    def __init__(self, call: Callable[[list[WireTensor]], object], seconds: float = 0.2):
        start = time.perf_counter()
        call([images(0, 256)])
        per_row = (time.perf_counter() - start) / 256
        rows = int(min(max(seconds / per_row, 256), 50_000))
        big = to_wire(np.resize(X.astype(np.float32), (rows, 64)))
        self.thread = threading.Thread(target=call, args=([big],))

    def __enter__(self) -> Busy:
        self.thread.start()
        time.sleep(0.01)  # it holds the runner before the others come
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(30)


def concurrently(call: Callable[[int], object], n: int = THREADS) -> list[object]:
    """call(i) from n threads released together; each slot holds the result or the exception raised."""
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(i)
        except Exception as exc:  # kept for the test to look at
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


class Sizes:
    """Records the calls each run served (the daemon's histogram hears the same)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, model: str, where: str, calls: int) -> None:
        with self._lock:
            self.seen.append((model, where, calls))

    def calls(self) -> Counter:
        return Counter(calls for _, _, calls in self.seen)


def assert_same(got: list[WireTensor], want: list[WireTensor], exact: bool) -> None:
    assert [(t[0], t[1]) for t in got] == [(t[0], t[1]) for t in want]
    for g, w in zip(got, want, strict=True):
        if exact or g[0] != "float32":
            assert g[2] == w[2]
        else:
            np.testing.assert_allclose(from_wire(g), from_wire(w), rtol=1e-5, atol=1e-6)


# -- stacking and splitting ------------------------------------------------------------------------

def test_signature_refuses_what_cannot_be_stacked():
    assert signature([images(0, 3)]) == ((("float32", (64,)),), 3)
    assert signature([]) is None
    assert signature([("float32", [], b"\0" * 4)]) is None  # a scalar has no batch dimension
    assert signature([images(0, 2), images(0, 3)]) is None  # inputs of different row counts
    assert signature([("float32", [2, 64], b"\0" * 10)]) is None  # bytes that do not fill the shape
    assert signature([("complex64", [1, 1], b"\0" * 8)]) is None


def test_stack_then_split_gives_each_caller_its_rows():
    calls = [[images(0, 2)], [images(2, 1)], [images(3, 4)]]
    stacked = stack(calls)
    assert stacked[0][1] == [7, 64]
    assert np.array_equal(from_wire(stacked[0]), X[:7].astype(np.float32))
    shares = split(stacked, [2, 1, 4])
    assert shares is not None
    assert [share[0] for share in shares] == [call[0] for call in calls]
    assert split([("float32", [1], b"\0" * 4)], [2, 1, 4]) is None  # not one row per input row


# -- local models ----------------------------------------------------------------------------------

# (model, variant, exact): the int8 variants answer bit for bit what they answer alone (integer kernels
# sum in the same order whatever the batch); fp32 kernels may block the sums differently per batch size.
CASES = [("digits", "fp32", False), ("digits", "int8", True), ("digits-cnn", "fp32", False),
         ("digits-cnn", "int8", True), ("digits-cnn", "tflite-fp32", False), ("digits-cnn", "tflite-int8", True)]


@pytest.mark.parametrize(("model", "variant", "exact"), CASES)
def test_batched_answers_equal_unbatched(model, variant, exact):
    registry = ModelRegistry([MODELS], variants={model: variant})
    sizes = Sizes()
    # A long wait: all the threads released together must land in few batches even on a busy machine.
    batcher = Batcher(registry, max_calls=THREADS, wait_s=2.0, runners=1, on_batch=sizes)
    calls = [[images(40 * i, 1 + i % 4)] for i in range(THREADS)]
    alone = [registry.infer(model, call) for call in calls]
    with Busy(lambda inputs: batcher.local(model, inputs)):
        got = concurrently(lambda i: batcher.local(model, calls[i]))
    for g, want in zip(got, alone, strict=True):
        assert not isinstance(g, Exception), g
        assert_same(g, want, exact)
    assert sum(n for _, _, n in sizes.seen) == THREADS + 2  # and Busy's two calls
    assert max(sizes.calls()) > 1, f"nothing was coalesced: {sizes.seen}"
    assert {(m, w) for m, w, _ in sizes.seen} == {(model, "local")}


def test_a_model_with_a_fixed_batch_runs_each_call_alone():
    registry = ModelRegistry([MODELS], variants={"digits": "fp32"})
    runs: list[int] = []

    def fixed_batch(inputs: list[WireTensor]) -> list[WireTensor]:
        runs.append(inputs[0][1][0])
        return registry.infer("digits", inputs)

    coalescer = Coalescer(fixed_batch, batchable=False, max_calls=THREADS, wait_s=0.5)
    got = concurrently(lambda i: coalescer.infer([images(i, 1)]))
    assert runs == [1] * THREADS
    for i, g in enumerate(got):
        assert_same(g, registry.infer("digits", [images(i, 1)]), exact=True)


def test_a_lone_call_does_not_wait_for_company():
    registry = ModelRegistry([MODELS], variants={"digits": "fp32"})
    sizes = Sizes()
    batcher = Batcher(registry, max_calls=16, wait_s=0.2, on_batch=sizes)
    batcher.local("digits", [images(0, 1)])  # loads the session
    for _ in range(5):
        start = time.perf_counter()
        batcher.local("digits", [images(0, 1)])
        assert time.perf_counter() - start < 0.05  # far below the 200 ms a leader may wait
    assert sizes.calls() == Counter({1: 6})


def test_a_call_waits_for_a_free_runner_no_longer_than_the_wait():
    started: list[float] = []

    def slow(inputs: list[WireTensor]) -> list[WireTensor]:
        started.append(time.perf_counter())
        time.sleep(0.3)
        return inputs

    coalescer = Coalescer(slow, runners=1, wait_s=0.05)
    first = threading.Thread(target=coalescer.infer, args=([images(0, 1)],))
    first.start()
    time.sleep(0.02)
    assert coalescer.infer([images(1, 1)]) == [images(1, 1)]
    first.join()
    assert 0.04 <= started[1] - started[0] < 0.2  # it waited for the runner, then went ahead anyway


def test_batch_max_one_turns_batching_off():
    registry = ModelRegistry([MODELS], variants={"digits": "fp32"})
    sizes = Sizes()
    batcher = Batcher(registry, max_calls=1, wait_s=0.5, on_batch=sizes)
    got = concurrently(lambda i: batcher.local("digits", [images(i, 2)]))
    assert all(not isinstance(g, Exception) for g in got)
    assert sizes.calls() == Counter({1: THREADS})


def test_inputs_of_other_shapes_are_not_stacked_together():
    registry = ModelRegistry([MODELS], variants={"digits": "fp32"})
    sizes = Sizes()
    batcher = Batcher(registry, max_calls=THREADS, wait_s=0.3, on_batch=sizes)
    bad = ("float32", [1, 32], np.zeros((1, 32), np.float32).tobytes())  # half an image: the model refuses it

    def call(i: int) -> list[WireTensor]:
        return batcher.local("digits", [bad if i % 2 else images(i, 1)])

    got = concurrently(call)
    for i, g in enumerate(got):
        if i % 2:
            assert isinstance(g, ModelError) and "pixels" in str(g)
        else:
            assert_same(g, registry.infer("digits", [images(i, 1)]), exact=False)


def test_outputs_without_a_batch_dimension_fall_back_to_one_call_at_a_time():
    seen: list[int] = []
    lock = threading.Lock()

    def total(inputs: list[WireTensor]) -> list[WireTensor]:  # one number for the whole batch
        with lock:
            seen.append(inputs[0][1][0])
        time.sleep(0.02)  # slow enough that the threads released together meet in the coalescer
        return [to_wire(np.array([from_wire(inputs[0]).sum()], np.float32))]

    coalescer = Coalescer(total, max_calls=THREADS, wait_s=0.5)
    got = concurrently(lambda i: coalescer.infer([images(i, 1)]))
    for i, g in enumerate(got):
        assert from_wire(g[0])[0] == pytest.approx(float(X[i].sum()))
    assert not coalescer.batchable
    assert max(seen) > 1 and seen.count(1) == THREADS  # one stacked try, then each call alone


# -- the cloud endpoint ----------------------------------------------------------------------------

@pytest.fixture()
def fp32_cloud():
    served = ModelRegistry([MODELS], variants={"digits-cnn": "fp32", "digits": "fp32"},
                           chains={"onnx": DEFAULT_CHAINS["onnx"]})
    with start_server(OipEndpoint(served)) as server:
        yield server


def test_the_cloud_answers_one_request_per_batch_with_each_callers_rows(fp32_cloud):
    registry = ModelRegistry([MODELS], variants={"digits-cnn": "fp32"})
    sizes = Sizes()
    # A request of stacked rows may take seconds on a loaded machine: the default 2 s timeout is a device's
    # choice, not what this test is about.
    with CloudClient(fp32_cloud.url, timeout_s=30) as client:
        batcher = Batcher(registry, client, max_calls=THREADS, wait_s=2.0, cloud_runners=1, on_batch=sizes)
        calls = [[images(30 * i, 1 + i % 3)] for i in range(THREADS)]
        with Busy(lambda inputs: batcher.cloud("digits-cnn", inputs)):
            got = concurrently(lambda i: batcher.cloud("digits-cnn", calls[i]))
    for g, call in zip(got, calls, strict=True):
        assert not isinstance(g, Exception), g
        assert_same(g, registry.infer("digits-cnn", call), exact=False)
    assert {(m, w) for m, w, _ in sizes.seen} == {("digits-cnn", "cloud")}
    assert max(sizes.calls()) > 1, f"nothing was coalesced: {sizes.seen}"


def test_an_error_of_a_batch_reaches_every_caller_of_it(fp32_cloud):
    requests: list[int] = []  # rows of each request sent
    with CloudClient(fp32_cloud.url, retries=0, breaker=CircuitBreaker(cooldown_s=60)) as client:
        client.infer("digits", [images(0, 1)])  # the endpoint's metadata, asked while it is there
        fp32_cloud.close()  # then it goes away: requests fail to connect

        def run(inputs: list[WireTensor]) -> list[WireTensor]:
            requests.append(inputs[0][1][0])
            if len(requests) == 1:
                time.sleep(0.2)  # the first call holds the only runner while the others gather
            return client.infer("digits", inputs)

        coalescer = Coalescer(run, runners=1, max_calls=THREADS, wait_s=2.0)
        got = concurrently(lambda i: coalescer.infer([images(i, 1)]))
    assert all(isinstance(g, CloudUnavailable) for g in got), got
    assert requests == [1, THREADS - 1]  # one request for the seven callers that met in a batch
    assert len({id(g) for g in got}) == THREADS  # each caller raises its own copy


def test_settings_refuse_a_batch_of_none():
    with pytest.raises(ConfigError, match="batch_max"):
        load_settings(batch_max=0)
    with pytest.raises(ConfigError, match="batch_wait_ms"):
        load_settings(batch_wait_ms=-1)
    assert (load_settings().batch_max, load_settings().batch_wait_ms) == (16, 2.0)


def batch_histogram(d: Daemon, model: str, where: str = "local") -> tuple[float, float]:
    """(runs, calls) of edgefn_inference_batch_calls for the model, from GET /metrics."""
    assert d.observe is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{d.observe.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f'edgefn_inference_batch_calls_{part}{{model="{model}",where="{where}"}} '):
                found[part] = float(line.split()[-1])
    return found.get("count", 0.0), found.get("sum", 0.0)


@pytest.mark.broker
def test_a_daemon_with_batching_on_answers_as_without(broker, collector, settings_for, digits_fn):
    results = collector("results/+/digits")
    # workers=0: the batch histogram of this process (a worker process's is its own)
    d = Daemon(settings_for(broker, digits_fn, batch_max=16, batch_wait_ms=5, model_variants={"digits": "fp32"},
                               metrics_port=0, workers=0))
    d.start()
    try:
        d.wait_connected(10)
        payloads, _ = digit_payloads(120, "batched")
        publish(broker.port, "sensors/dev1/digits", payloads)
        docs = [doc for _, doc in results.wait_for(120, timeout=30)]
        assert len(docs) == 120
        registry = ModelRegistry([MODELS], variants={"digits": "fp32"})
        start = 1400
        want = from_wire(registry.infer("digits", [images(start, 120)])[0])  # labels, one call, unbatched
        by_id = {doc["event_id"]: doc["label"] for doc in docs}
        assert [by_id[f"batched-{k}"] for k in range(120)] == want.tolist()
        runs, calls = batch_histogram(d, "digits")
        assert runs >= 1 and calls >= runs
    finally:
        d.stop(drain_timeout=2)
