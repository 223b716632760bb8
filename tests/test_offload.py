"""Hand-off to the cloud endpoint: the planner's decision, and the daemon against a real OIP v2 server
(`edgefn cloud serve`, in this process) and a real mosquitto: handed-off results say so, a cloud
that is gone costs nothing but the hand-off, low confidence asks the cloud's model."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from fastapi import Request
from typer.testing import CliRunner

from cloud_sync.serve import OipEndpoint, start_server
from edgefn.cli.main import app
from edgefn.daemon import Daemon
from edgefn.functions.host import _unsure
from edgefn.offload.planner import Planner
from tests.conftest import MODELS, publish
from tests.test_daemon import digit_payloads

# --- the decision ---------------------------------------------------------------------------------


def test_never_and_always_do_not_look_at_the_load():
    assert Planner("never", 10, 1).admit(10_000, under_pressure=True) == "local"
    assert Planner("always", 10, 1).admit(0) == "cloud"
    assert Planner("on-low-confidence", 10, 1).admit(10_000) == "local"  # asked again after, if unsure


def test_on_overload_queues_here_only_what_meets_the_budget():
    planner = Planner("on-overload", budget_ms=100, workers=2)
    for _ in range(50):
        planner.served_here(10, 0.010)  # 1 ms an event
    assert planner.per_event_s == pytest.approx(0.001, rel=0.01)
    assert planner.admit(queued_here=150) == "local"  # 151 events / 2 workers: 76 ms
    assert planner.admit(queued_here=250) == "cloud"  # 126 ms of work ahead: out
    assert planner.admit(queued_here=0, under_pressure=True) == "cloud"  # too hot: out


def test_the_service_time_follows_a_slower_device():
    planner = Planner("on-overload", budget_ms=50, workers=1, initial_s=0.001)
    assert planner.admit(20) == "local"
    for _ in range(20):
        planner.served_here(4, 0.040)  # 10 ms an event now (throttled)
    assert planner.admit(20) == "cloud"


def test_a_backed_up_cloud_lane_sends_the_surplus_where_it_finishes_first():
    planner = Planner("on-overload", budget_ms=10, workers=1, cloud_workers=4)
    for _ in range(50):
        planner.served_here(1, 0.001)  # 1 ms an event here
        planner.served_on_cloud(1, 0.040)  # 40 ms an event through the cloud lane: 10 ms per event of 4 workers
    assert planner.admit(queued_here=5) == "local"  # 6 ms: within the budget
    assert planner.admit(queued_here=50, queued_cloud=0) == "cloud"  # 51 ms here, 10 ms there
    assert planner.admit(queued_here=50, queued_cloud=20) == "local"  # 210 ms there: here is sooner
    assert planner.admit(queued_here=50, queued_cloud=20, under_pressure=True) == "cloud"  # too hot: out anyway


def test_a_bad_policy_is_refused():
    with pytest.raises(ValueError, match="offload policy must be one of"):
        Planner("sometimes", 10, 1)  # type: ignore[arg-type]


def test_unsure_reads_the_top_score_of_each_row():
    sure = np.array([[0.9, 0.1], [0.2, 0.8]], dtype="<f4")
    unsure = np.array([[0.9, 0.1], [0.55, 0.45]], dtype="<f4")
    label = ("int64", [2], np.zeros(2, dtype="<i8").tobytes())
    assert not _unsure([label, ("float32", [2, 2], sure.tobytes())], 0.6)
    assert _unsure([label, ("float32", [2, 2], unsure.tobytes())], 0.6)
    assert not _unsure([label], 0.6)  # no scores: nothing to be unsure of


# --- the daemon against a real endpoint ---------------------------------------------------------------


@pytest.fixture()
def cloud():
    with start_server(MODELS) as server:
        yield server


def results_of(collector, n: int) -> list[dict]:
    got = collector.wait_for(n, timeout=30)
    assert len(got) == n, f"{len(got)} of {n} results"
    return [doc for _, doc in got]


def offload_count(d: Daemon, outcome: str) -> float:
    prefix = f'edgefn_offload_total{{function="digits",outcome="{outcome}",'
    return sum(float(line.split()[-1]) for line in d.metrics.render().decode().splitlines()
               if line.startswith(prefix))


@pytest.mark.broker
def test_always_runs_inference_on_the_cloud_and_results_say_so(broker, collector, settings_for, digits_fn, cloud):
    results = collector("results/+/digits")
    d = Daemon(settings_for(broker, digits_fn, cloud_url=cloud.url, offload="always"))
    d.start()
    try:
        d.wait_connected(10)
        payloads, labels = digit_payloads(40, "cloud")
        publish(broker.port, "sensors/dev1/digits", payloads)
        docs = results_of(results, 40)
        assert {doc["ran_on"] for doc in docs} == {"cloud"}
        assert sum(doc["label"] == labels[doc["event_id"]] for doc in docs) / 40 >= 0.85
        assert offload_count(d, "handed-off") >= 1
    finally:
        d.stop(drain_timeout=2)


@pytest.mark.broker
def test_a_cloud_that_is_gone_costs_no_event(broker, collector, settings_for, digits_fn, cloud):
    results = collector("results/+/digits")
    cloud.close()  # the endpoint is configured, and nobody answers there
    d = Daemon(settings_for(broker, digits_fn, cloud_url=cloud.url, offload="always", cloud_timeout_s=0.5))
    d.start()
    try:
        d.wait_connected(10)
        payloads, _ = digit_payloads(60, "gone")
        for k in range(0, 60, 6):  # rounds apart: each batch tries the cloud once, until the breaker opens
            publish(broker.port, "sensors/dev2/digits", payloads[k:k + 6])
            results_of(results, k + 6)
        docs = results_of(results, 60)
        assert {doc["ran_on"] for doc in docs} == {"local"}
        assert offload_count(d, "ran-here-instead") >= 1
        text = d.metrics.render().decode()
        assert 'edgefn_cloud_breaker{state="open"} 1.0' in text  # after a few failures it stops trying
    finally:
        d.stop(drain_timeout=2)


@pytest.mark.broker
@pytest.mark.parametrize(("threshold", "ran_on"), [(1.0, {"cloud"}), (0.0, {"local"})])
def test_low_confidence_asks_the_clouds_model(broker, collector, settings_for, digits_fn, cloud, tmp_path,
                                              threshold, ran_on):
    fn = tmp_path / "digits"
    fn.mkdir()
    for item in digits_fn.iterdir():
        (fn / item.name).symlink_to(item)
    (fn / "edgefn.toml").unlink()
    manifest = (digits_fn / "edgefn.toml").read_text()
    # Top-level keys go before the first table.
    (fn / "edgefn.toml").write_text(f'offload = "on-low-confidence"\nconfidence_threshold = {threshold}\n' + manifest)
    results = collector("results/+/digits")
    d = Daemon(settings_for(broker, fn, cloud_url=cloud.url))
    d.start()
    try:
        d.wait_connected(10)
        publish(broker.port, "sensors/dev3/digits", digit_payloads(10, "joint")[0])
        assert {doc["ran_on"] for doc in results_of(results, 10)} == ran_on
        assert (offload_count(d, "asked-again") > 0) == (ran_on == {"cloud"})
    finally:
        d.stop(drain_timeout=2)



@pytest.mark.broker
def test_hand_off_resumes_when_the_cloud_comes_back(broker, collector, settings_for, digits_fn):
    from urllib.parse import urlsplit

    first = start_server(MODELS)
    port = urlsplit(first.url).port
    first.close()  # away from the start: the breaker opens, work runs here
    results = collector("results/+/digits")
    d = Daemon(settings_for(broker, digits_fn, cloud_url=f"http://127.0.0.1:{port}", offload="always",
                            cloud_timeout_s=0.5, cloud_cooldown_s=0.3))
    d.start()
    try:
        d.wait_connected(10)
        payloads, _ = digit_payloads(1000, "back")
        sent = 0
        for _ in range(8):  # until the breaker has opened
            publish(broker.port, "sensors/dev4/digits", payloads[sent:sent + 5])
            sent += 5
            results_of(results, sent)
        assert {doc["ran_on"] for doc in results_of(results, sent)} == {"local"}
        with start_server(MODELS, port=port):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "cloud" not in {doc["ran_on"] for doc in results_of(results, sent)}:
                publish(broker.port, "sensors/dev4/digits", payloads[sent:sent + 5])
                sent += 5
                results_of(results, sent)
                time.sleep(0.1)
            assert "cloud" in {doc["ran_on"] for doc in results_of(results, sent)}, "hand-off never resumed"
    finally:
        d.stop(drain_timeout=2)


@pytest.mark.broker
def test_an_endpoint_that_cannot_serve_the_model_is_named_at_the_first_event(broker, collector, settings_for,
                                                                            digits_fn, cloud, caplog):
    """The event runs here, and the hand-off says why out loud: a warning at once, the metric's reason,
    /healthz and `edgefn status`."""
    caplog.set_level(logging.WARNING, logger="edgefn.offload")
    results = collector("results/+/digits")
    d = Daemon(settings_for(broker, digits_fn, cloud_url=cloud.url, offload="always",
                            cloud_model_map={"digits": "digits-gone"}, metrics_port=0))
    d.start()
    try:
        d.wait_connected(10)
        publish(broker.port, "sensors/dev5/digits", digit_payloads(1, "gone")[0])
        assert [doc["ran_on"] for doc in results_of(results, 1)] == ["local"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("hand-off of digits" in w and "not-served" in w and "digits-gone" in w for w in warnings), warnings
        assert 'reason="not-served"' in d.metrics.render().decode()
        cloud_health = d.health()["cloud"]
        assert (cloud_health["state"], cloud_health["failing"]) == ("failing", ["digits"])
        assert cloud_health["last_error"]["reason"] == "not-served"
        assert d.health()["status"] == "degraded"  # the events run here, not where the operator meant them
        assert d.health()["problem"].startswith(f"hand-off to {cloud.url} fails for digits (not-served: ")
        status = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["status", "--port", str(d.observe.port)])
        assert status.exit_code == 1, status.output
        assert f"{cloud.url}: failing (digits), breaker closed" in status.output
        assert "cloud last error" in status.output and "digits (not-served)" in status.output
    finally:
        d.stop(drain_timeout=2)


class CountingEndpoint(OipEndpoint):
    """The real endpoint, counting the requests that reach it (refused ones included)."""

    asked = 0

    async def _gate(self, request: Request) -> None:
        self.asked += 1
        await super()._gate(request)


@pytest.fixture()
def guarded():
    """An endpoint that wants a token the daemon does not have (a wrong one is set, as after a rotation)."""
    endpoint = CountingEndpoint.from_folders([MODELS], auth=("Authorization", "Bearer the-right-one"))
    with start_server(endpoint) as server:
        yield server, endpoint


def wrong_token(monkeypatch) -> dict:
    monkeypatch.setenv("EDGEFN_TEST_CLOUD_TOKEN", "Bearer a-wrong-one")
    return {"cloud_auth_header": "Authorization", "cloud_auth_env": "EDGEFN_TEST_CLOUD_TOKEN"}


@pytest.mark.broker
def test_a_refusing_endpoint_is_asked_once_and_every_event_runs_here(broker, collector, settings_for, digits_fn,
                                                                      guarded, monkeypatch):
    """A 401 opens the breaker for a minute: the batches after it run here without asking (the old client
    asked on every batch, and was refused every time)."""
    server, endpoint = guarded
    results = collector("results/+/digits")
    d = Daemon(settings_for(broker, digits_fn, cloud_url=server.url, offload="always", **wrong_token(monkeypatch)))
    d.start()
    try:
        d.wait_connected(10)
        payloads, labels = digit_payloads(60, "refused")
        publish(broker.port, "sensors/dev6/digits", payloads[:1])
        results_of(results, 1)
        assert endpoint.asked == 1
        for k in range(1, 60, 6):  # rounds apart: each batch would ask the endpoint
            publish(broker.port, "sensors/dev6/digits", payloads[k:k + 6])
            results_of(results, min(60, k + 6))
        docs = results_of(results, 60)
        assert {doc["ran_on"] for doc in docs} == {"local"}
        assert sum(doc["label"] == labels[doc["event_id"]] for doc in docs) / 60 >= 0.85
        assert endpoint.asked == 1, f"{endpoint.asked} requests reached the endpoint after its 401"
        cloud_health = d.health()["cloud"]
        assert (cloud_health["breaker"], cloud_health["breaker_reason"]) == ("open", "refused")
    finally:
        d.stop(drain_timeout=2)


@pytest.mark.broker
def test_healthz_is_degraded_while_the_endpoint_refuses_and_says_why(broker, collector, settings_for, digits_fn,
                                                                    guarded, monkeypatch):
    server, _ = guarded
    results = collector("results/+/digits")
    d = Daemon(settings_for(broker, digits_fn, cloud_url=server.url, offload="always", metrics_port=0,
                            **wrong_token(monkeypatch)))
    d.start()
    try:
        d.wait_connected(10)
        with urllib.request.urlopen(f"http://127.0.0.1:{d.observe.port}/healthz", timeout=5) as answer:
            assert json.load(answer)["status"] == "ok"  # nothing handed off yet
        publish(broker.port, "sensors/dev7/digits", digit_payloads(1, "refused")[0])
        assert [doc["ran_on"] for doc in results_of(results, 1)] == ["local"]
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"http://127.0.0.1:{d.observe.port}/healthz", timeout=5)
        doc = json.load(unhealthy.value)
        assert unhealthy.value.code == 503 and doc["status"] == "degraded", doc
        assert f"{server.url} refuses hand-off (401 missing or wrong Authorization header)" in doc["problem"]
        assert "events run here" in doc["problem"] and "asked again in" in doc["problem"]
        status = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["status", "--port", str(d.observe.port)])
        assert "breaker open (refused)" in status.output, status.output
    finally:
        d.stop(drain_timeout=2)
