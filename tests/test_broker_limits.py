"""A broker's limits, as its CONNACK says them, obeyed by the results session: a real mosquitto set to
allow QoS 0 only, or no retained messages (or small packets), and a real function (tests/guests/alerts)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefn.daemon import Daemon
from edgefn.mqtt.local_broker import LocalBroker
from tests.conftest import GUESTS, Collector, _built_copy, eventually


@pytest.fixture(scope="module")
def alerts_fn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built_copy(GUESTS / "alerts", tmp_path_factory.mktemp("fn"))


def _publish_qos0(port: int, topic: str, payloads: list[bytes]) -> None:
    """As a sensor would to a broker that takes QoS 0 only (a QoS 1 PUBLISH gets it dropped)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sensor-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for info in [client.publish(topic, p, qos=0) for p in payloads]:
        info.wait_for_publish(10)
    time.sleep(0.2)  # written is not yet read by the broker: let it read them before we hang up
    client.disconnect()
    client.loop_stop()


@pytest.fixture()
def limited(settings_for, alerts_fn, request: pytest.FixtureRequest) -> Iterator[tuple[LocalBroker, Daemon, Collector]]:
    """A broker with `request.param`'s limit (its notices logged: each connection is), the alerts
    function's daemon on it, and a collector of its answers."""
    with LocalBroker(extra_config=f"log_type notice\n{request.param}\n") as broker:
        answers = Collector(broker.port, "alerts/#", "results/#")
        d = Daemon(settings_for(broker, alerts_fn))
        d.start()
        try:
            d.wait_connected(10)
            yield broker, d, answers
        finally:
            d.stop(drain_timeout=0.5)
            answers.close()


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Lines logged since the daemon started (it connects in the fixture's setup)."""
    return [r.getMessage() for r in caplog.get_records("setup") + caplog.get_records("call")]


def _results_connections(broker: LocalBroker, d: Daemon) -> int:
    return broker.log_text().count(f" as {d.settings.client_id}-results ")


@pytest.mark.parametrize("limited", ["max_qos 0"], indirect=True)
def test_a_broker_that_allows_qos_0_only_gets_every_answer_at_qos_0_and_no_reconnect_loop(limited, caplog):
    # A QoS 1 PUBLISH made mosquitto drop the results session; egress resent it after the reconnect,
    # once a second, and no answer ever left the outbox.
    broker, d, answers = limited
    _publish_qos0(broker.port, "sensors/dev1/alerts", [b"plain"] * 20)
    assert answers.wait_for(20, 15) == [("results/dev1/alerts", b"plain")] * 20
    assert eventually(lambda: d.outbox.awaiting_ack == 0 and not d.inbox.outbox(), 5)  # counted as delivered
    time.sleep(1.5)  # the old loop reconnected once a second
    assert _results_connections(broker, d) == 1
    health = d.health()
    assert health["broker_limits"]["maximum_qos"] == 0
    assert health["status"] == "degraded" and "QoS 0 only" in health["problem"]
    said = [r for r in _logged(caplog) if "Maximum QoS 0" in r]
    assert len(said) == 1, said


@pytest.mark.parametrize("limited", ["retain_available false"], indirect=True)
def test_a_broker_without_retain_gets_retained_answers_not_retained_and_no_reconnect_loop(limited, caplog):
    broker, d, answers = limited
    _publish_qos0(broker.port, "sensors/dev1/alerts", [b"alert:overheat", b"plain", b"alert:smoke"])
    assert answers.wait_for(3, 15) == [("alerts/dev1/last", b"overheat"), ("results/dev1/alerts", b"plain"),
                                       ("alerts/dev1/last", b"smoke")]
    assert [retained for _, retained in answers.delivery] == [False] * 3
    assert eventually(lambda: d.outbox.awaiting_ack == 0 and not d.inbox.outbox(), 5)
    time.sleep(1.5)
    assert _results_connections(broker, d) == 1
    assert d.health()["broker_limits"]["retain_available"] is False
    assert d.health()["status"] == "ok"  # a retained answer is still delivered, at least once
    said = [r for r in _logged(caplog) if "Retain Available 0" in r]
    assert len(said) == 1, said


@pytest.mark.parametrize("limited", ["max_packet_size 1000"], indirect=True)
def test_an_answer_larger_than_the_broker_takes_is_refused_not_sent(limited):
    # The event fits the broker's 1000 bytes (991); its answer, with the daemon's and the function's
    # user properties and a QoS 1 packet id, does not: sent, it got the results session dropped.
    broker, d, answers = limited
    _publish_qos0(broker.port, "sensors/dev1/alerts", [b"alert:" + b"x" * 960, b"plain"])
    assert answers.wait_for(1, 15) == [("results/dev1/alerts", b"plain")]
    metrics = d.metrics.render().decode()
    assert eventually(lambda: "edgefn_messages_refused_total 1.0" in d.metrics.render().decode(), 5), metrics
    assert d.health()["broker_limits"]["maximum_packet_size"] == 1000
    time.sleep(1.5)
    assert _results_connections(broker, d) == 1
    assert answers.messages == [("results/dev1/alerts", b"plain")]
