"""The hand-off against the inference servers people run, started here from the registry's packages
(`make peers`): Seldon MLServer (its scikit-learn runtime, and a custom ONNX runtime whose
model-settings declare the tensors or do not) and KServe's Python model server (V2 REST). Each hands
the digits model off with the answers of the local model; MLServer killed mid-stream loses nothing.
Test ids name the server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.daemon import Daemon
from edgefn.errors import CloudError
from edgefn.inference.registry import ModelRegistry
from edgefn.inference.tensors import from_wire, to_wire
from edgefn.offload.client import CloudClient
from tests.conftest import DIGITS_FN, MODELS, publish
from tests.peers.servers import MLSERVER_ROUTES, PeerServer, mlserver_repository, start_kserve, start_mlserver
from tests.test_daemon import X, digit_payloads

PEERS = [*MLSERVER_ROUTES, "kserve"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlserver_repository(tmp_path_factory.mktemp("mlserver") / "models")


@pytest.fixture(scope="module")
def mlserver(repository: Path) -> Iterator[PeerServer]:
    with start_mlserver(repository, repository.parent / "mlserver.log") as server:
        yield server


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerServer]:
    with start_kserve(tmp_path_factory.mktemp("kserve") / "kserve.log") as server:
        yield server


@pytest.fixture()
def peer(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """(url, --cloud-model map) of the server the test's id names; each server starts once per module."""
    name = request.param
    if name == "kserve":
        return request.getfixturevalue("kserve").url, {}
    return request.getfixturevalue("mlserver").url, {"digits": MLSERVER_ROUTES[name]}


@pytest.fixture(scope="module")
def local() -> ModelRegistry:
    return ModelRegistry([MODELS], variants={"digits": "fp32"})  # the variant every server serves


@pytest.mark.parametrize("peer", PEERS, indirect=True)
def test_client_hands_digits_off_with_the_local_answers(peer, local: ModelRegistry):
    url, routes = peer
    x = np.load(MODELS / "digits" / "validation.npz")["x"]
    with CloudClient(url, model_map=routes, binary_threshold=0) as client:
        for rows in (1, 16, len(x)):
            got = [from_wire(t) for t in client.infer("digits", [to_wire(x[:rows])], contract=local.info("digits"))]
            label, probabilities = (from_wire(t) for t in local.infer("digits", [to_wire(x[:rows])]))
            assert [(g.dtype, g.shape) for g in got] == [(label.dtype, label.shape),
                                                         (probabilities.dtype, probabilities.shape)]
            np.testing.assert_array_equal(got[0], label)
            np.testing.assert_allclose(got[1], probabilities, atol=1e-5)
        assert client.status.snapshot()["state"] == "ok"


def test_mlserver_declared_metadata_that_disagrees_is_named(mlserver: PeerServer, local: ModelRegistry):
    x = np.load(MODELS / "digits" / "validation.npz")["x"][:1]
    with CloudClient(mlserver.url, model_map={"digits": "digits-declared,pixels=images"}) as client:
        with pytest.raises(CloudError) as wrong:
            client.infer("digits", [to_wire(x)], contract=local.info("digits"))
    assert wrong.value.reason == "mismatch"
    assert "no input images (it declares pixels)" in str(wrong.value)


def local_answers(local: ModelRegistry, payload_index: dict[str, int]) -> dict[str, tuple[int, float]]:
    """(label, score) of the local fp32 model for each event id."""
    ids = list(payload_index)
    x = X[[payload_index[i] for i in ids]].astype(np.float32)
    label, probabilities = (from_wire(t) for t in local.infer("digits", [to_wire(x)]))
    return {i: (int(label[k]), float(probabilities[k].max())) for k, i in enumerate(ids)}


def indexes(n: int, start: int = 1400) -> list[int]:
    return [start + k % (len(X) - start) for k in range(n)]  # as digit_payloads picks them


@pytest.mark.broker
@pytest.mark.parametrize("peer", PEERS, indirect=True)
def test_offload_always_answers_every_event_on_the_peer_as_here(peer, broker, collector, settings_for, digits_fn,
                                                                local: ModelRegistry):
    url, routes = peer
    n = 200
    results = collector("results/+/digits")
    d = Daemon(settings_for(broker, digits_fn, cloud_url=url, cloud_model_map=routes, offload="always",
                            model_variants={"digits": "fp32"}))
    d.start()
    try:
        d.wait_connected(10)
        payloads, _ = digit_payloads(n, "peer")
        publish(broker.port, "sensors/dev1/digits", payloads)
        docs = [doc for _, doc in results.wait_for(n, timeout=60)]
        assert len(docs) == n
        assert {doc["ran_on"] for doc in docs} == {"cloud"}
        want = local_answers(local, {f"peer-{k}": i for k, i in enumerate(indexes(n))})
        for doc in docs:
            label, score = want[doc["event_id"]]
            assert doc["label"] == label
            assert doc["score"] == pytest.approx(score, abs=1e-4)
        assert d.health()["cloud"]["state"] == "ok"
    finally:
        d.stop(drain_timeout=2)


@pytest.mark.broker
def test_mlserver_killed_mid_stream_loses_nothing(repository: Path, broker, collector, settings_for, digits_fn):
    server = start_mlserver(repository, repository.parent / "mlserver-killed.log")
    n = 600
    results = collector("results/+/digits")
    d = Daemon(settings_for(broker, digits_fn, cloud_url=server.url, cloud_model_map={"digits": "digits-onnx"},
                            offload="always", cloud_timeout_s=1.0))
    d.start()
    try:
        d.wait_connected(10)
        payloads, labels = digit_payloads(n, "killed")

        def stream() -> None:  # one sensor, 10 events every 20 ms
            sensor = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sensor-stream")
            sensor.connect("127.0.0.1", broker.port)
            sensor.loop_start()
            try:
                sent = []
                for k, payload in enumerate(payloads):
                    sent.append(sensor.publish("sensors/dev2/digits", payload, qos=1))
                    if k % 10 == 9:
                        time.sleep(0.02)
                for info in sent:
                    info.wait_for_publish(10)
            finally:
                sensor.loop_stop()
                sensor.disconnect()

        sender = threading.Thread(target=stream)
        sender.start()
        deadline = time.monotonic() + 30
        while len(results.messages) < n // 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()
        sender.join()
        docs = [doc for _, doc in results.wait_for(n, timeout=60)]

        assert {doc["event_id"] for doc in docs} == set(labels), "events lost"
        where = {doc["ran_on"] for doc in docs}
        assert where == {"cloud", "local"}, f"the kill was not mid-stream: all ran on {where}"
        cloud = d.health()["cloud"]
        assert cloud["state"] == "failing" and cloud["last_error"]["reason"] in (
            "unreachable", "breaker-open", "server-error", "timeout")
    finally:
        d.stop(drain_timeout=2)
        server.kill()


@pytest.mark.parametrize("peer", PEERS, indirect=True)
def test_cloud_check_passes_the_peer_and_names_a_wrong_route(peer):
    url, routes = peer
    cloud_model = [f"digits={routes['digits']}"] if routes else []
    args = ["cloud", "check", url, "-f", str(DIGITS_FN), "-m", str(MODELS), "--json"]
    result = CliRunner().invoke(app, [*args, *(["--cloud-model", *cloud_model] if cloud_model else [])])
    assert result.exit_code == 0, result.output
    (digits,) = json.loads(result.output)["models"]
    assert digits["ok"] and digits["rows"] == 397 and digits["agreement"] >= 0.95
    wrong = CliRunner().invoke(app, [*args, "--cloud-model", "digits=digits-gone"])
    assert wrong.exit_code == 1
    assert json.loads(wrong.output)["models"][0]["problem"].startswith("not-served")
