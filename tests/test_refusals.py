"""What a broker refuses this client (an ACL): counted, said once, and shown in /healthz until taken again."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from edgefn.daemon import Daemon
from edgefn.mqtt.local_broker import LocalBroker
from edgefn.observe.refusals import BrokerRefusals
from tests.conftest import Collector, eventually, publish
from tests.test_daemon import digit_payloads

SERIES = 'edgefn_broker_refusals_total{filter="results/+/digits",kind="publish",reason="Not authorized"}'


def _healthz(d: Daemon) -> tuple[int, dict]:
    try:
        answer = urllib.request.urlopen(f"http://127.0.0.1:{d.observe.port}/healthz")
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())
    return answer.status, json.loads(answer.read())


def test_answers_an_acl_refuses_are_one_line_a_metric_and_degraded_health(tmp_path, settings_for, digits_fn, caplog):
    """100 events whose answers the ACL denies: one ERROR line (it was 100), the series counts 100, and
    /healthz degraded saying what is refused (it said "ok"); an accepted answer on that filter clears it."""
    acl = tmp_path / "acl"  # anonymous clients: the sensors and edgefn's own topics, and one device's results
    acl.write_text("topic readwrite sensors/#\ntopic readwrite edgefn/#\ntopic readwrite results/allowed/#\n")
    caplog.set_level(logging.INFO, logger="edgefn")
    with LocalBroker(extra_config=f"acl_file {acl}\n") as acl_broker:
        results = Collector(acl_broker.port, "results/#")
        d = Daemon(settings_for(acl_broker, digits_fn, metrics_port=0))
        d.start()
        try:
            d.wait_connected(10)
            publish(acl_broker.port, "sensors/dev2/digits", digit_payloads(100, "denied")[0])
            assert eventually(lambda: f"{SERIES} 100.0" in d.metrics.render().decode(), 60), \
                [line for line in d.metrics.render().decode().splitlines() if "refus" in line]
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, errors
            assert "results/+/digits" in errors[0] and "Not authorized" in errors[0]

            code, health = _healthz(d)
            assert code == 503 and health["status"] == "degraded", health
            assert health["problem"] == "the broker refuses results/+/digits to this client: not authorized"
            assert health["broker_refusals"] == {"publish": {"results/+/digits": {"reason": "Not authorized",
                                                                                   "refused": 100}}}
            # Neither retried nor dropped: counted, and kept in the outbox (sent again at the next start).
            assert eventually(lambda: d.outbox.rows == 100, 10), d.outbox.rows
            assert health["last_delivery_s_ago"]["sensors/+/digits"] is not None  # the events came
            assert results.messages == []

            # The broker takes that filter again (here: another device's results): health is ok again.
            publish(acl_broker.port, "sensors/allowed/digits", digit_payloads(1, "allowed")[0])
            assert [doc["event_id"] for _, doc in results.wait_for(1)] == ["allowed-0"]
            assert eventually(lambda: _healthz(d)[1]["status"] == "ok", 10), _healthz(d)
            assert _healthz(d)[1]["broker_refusals"] == {}
            assert f"{SERIES} 100.0" in d.metrics.render().decode()  # a counter: what was refused stays counted
        finally:
            d.stop(drain_timeout=0.5)
            results.close()


def test_a_trigger_the_acl_never_delivers_shows_no_delivery_in_healthz(tmp_path, settings_for, digits_fn, caplog):
    """mosquitto grants the SUBACK for a filter its ACL denies reading and drops at delivery: the log says
    "subscribed to", and /healthz shows that filter with no delivery since the start."""
    acl = tmp_path / "acl"  # the sensors may publish; nobody may read them
    acl.write_text("topic write sensors/#\ntopic readwrite edgefn/#\ntopic readwrite results/#\n")
    caplog.set_level(logging.INFO, logger="edgefn")
    with LocalBroker(extra_config=f"acl_file {acl}\n") as acl_broker:
        d = Daemon(settings_for(acl_broker, digits_fn, metrics_port=0))
        d.start()
        try:
            d.wait_connected(10)
            assert eventually(lambda: any(r.getMessage() == "subscribed to sensors/+/digits" for r in caplog.records), 10)
            publish(acl_broker.port, "sensors/dev1/digits", digit_payloads(3, "unread")[0])
            assert not eventually(lambda: d.ingress.outstanding or "edgefn_events_received_total 0.0"
                                  not in d.metrics.render().decode(), 1.0)
            assert _healthz(d)[1]["last_delivery_s_ago"] == {"sensors/+/digits": None}
        finally:
            d.stop(drain_timeout=0.5)


def test_a_refused_subscription_is_said_once_counted_and_cleared_when_granted(caplog):
    """Brokers that do refuse a SUBACK (0x87, ...): the same bookkeeping as a refused publish."""
    counter = Counter("refusals", "", ["kind", "filter", "reason"], registry=CollectorRegistry())
    refusals = BrokerRefusals(counter)
    caplog.set_level(logging.INFO, logger="edgefn")
    for _ in range(5):
        refusals.subscribed("sensors/+/digits", "Not authorized")
    assert counter.labels("subscribe", "sensors/+/digits", "Not authorized")._value.get() == 5
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert refusals.problem() == "the broker refuses subscribing to sensors/+/digits to this client: not authorized"
    assert refusals.snapshot() == {"subscribe": {"sensors/+/digits": {"reason": "Not authorized", "refused": 5}}}
    refusals.subscribed("sensors/+/digits", None)
    assert refusals.problem() is None and refusals.snapshot() == {}
    assert refusals.filter_of("edgefn/errors/digits") == "edgefn/#"  # no publish filter: the first level
