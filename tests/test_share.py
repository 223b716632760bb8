"""Shared subscriptions (`$share/GROUP/FILTER` triggers) and events that no function takes, against a
real mosquitto and the digits component: one daemon answers a shared stream, two daemons split one
with every event answered exactly once between them, and an event delivered to no function is
answered on edgefn/errors/unrouted, counted, logged once and said by /healthz."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter as Tally
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.mqtt.connection import SESSION_EXPIRY_S
from edgefn.topics import UNROUTED_TOPIC
from tests.conftest import eventually, publish
from tests.test_daemon import digit_payloads

pytestmark = pytest.mark.broker


def triggered_by(digits_fn: Path, root: Path, *topics: str) -> Path:
    """The built digits function, copied, with these trigger topics (the component is still fresh: a
    manifest's trigger is not what it is built from)."""
    folder = root / "digits"
    shutil.copytree(digits_fn, folder)
    manifest = folder / "edgefn.toml"
    manifest.write_text(manifest.read_text().replace('topics = ["sensors/+/digits"]',
                                                     f"topics = {json.dumps(list(topics))}", 1))
    return folder


def counter(d, name: str) -> float:
    """A metric's value from the daemon's /metrics text (0 when it has no sample yet)."""
    for line in d.metrics.render().decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def handled(d) -> float:
    return sum(float(line.split()[-1]) for line in d.metrics.render().decode().splitlines()
               if line.startswith("edgefn_events_handled_total{"))


def test_a_shared_trigger_answers_its_events(broker, settings_for, started, digits_fn, tmp_path, collector):
    """Subscribed as `$share/g1/sensors/+/digits`, matched by `sensors/+/digits`: matched as written,
    every event was acknowledged and then answered as if no function took it."""
    results, unrouted = collector("results/+/digits"), collector(UNROUTED_TOPIC)
    d = started(settings_for(broker, triggered_by(digits_fn, tmp_path, "$share/g1/sensors/+/digits")))  # SUBACK in
    payloads, labels = digit_payloads(40, "shared")
    publish(broker.port, "sensors/dev4/digits", payloads)
    got = results.wait_for(40, timeout=20)
    assert sorted(doc["event_id"] for _, doc in got) == sorted(labels), f"{len(got)} of 40 answered"
    assert {t for t, _ in got} == {"results/dev4/digits"}
    assert unrouted.messages == [] and counter(d, "edgefn_events_unrouted_total") == 0
    assert d.health()["status"] == "ok" and d.health()["unrouted"] is None


def test_two_daemons_share_a_stream_and_answer_every_event_once(broker, settings_for, started, digits_fn, tmp_path,
                                                               component_cache, collector):
    """1,000 events on one `$share` stream, two daemons in its group: each event answered exactly once
    between them, and each daemon answered some. (A result's `edgefn-event` is the answering daemon's
    journal id, which the other daemon uses too: the sensor's own id, in the result, tells events apart.)"""
    results = collector("results/+/digits")
    fn = triggered_by(digits_fn, tmp_path, "$share/workers/sensors/+/digits")
    daemons = []
    for n in (1, 2):
        state = tmp_path / f"state{n}"
        state.mkdir()
        (state / "components").symlink_to(component_cache, target_is_directory=True)
        settings = settings_for(broker, fn, state_dir=state, client_id=f"edgefn-share-{n}-{time.time_ns()}")
        daemons.append(started(settings))  # connected and subscribed: its SUBACK came
    payloads, labels = digit_payloads(1000, "split")
    publish(broker.port, "sensors/dev8/digits", payloads)
    got = results.wait_for(1000, timeout=60)
    assert len(got) == 1000, f"{len(got)} of 1000 answered"
    assert eventually(lambda: sum(handled(d) for d in daemons) >= 1000, 10)
    time.sleep(1.0)  # a second answer to any of them would have come by now
    answers = Tally(doc["event_id"] for _, doc in results.messages)
    missing, twice = set(labels) - set(answers), sorted(e for e, n in answers.items() if n > 1)
    assert not missing and not twice, f"{len(missing)} unanswered, {len(twice)} answered more than once"
    assert all(props.get("edgefn-event") for props in results.properties)
    each = [handled(d) for d in daemons]
    assert sum(each) == 1000 and min(each) > 0, f"split {each}: both members of the group take events"
    assert [counter(d, "edgefn_events_received_total") for d in daemons] == each
    assert all(counter(d, "edgefn_events_unrouted_total") == 0 for d in daemons)


def test_an_event_no_function_takes_goes_to_the_error_topic_counted_and_said(broker, settings_for, started,
                                                                            digits_fn, collector, caplog):
    """The broker keeps our persistent session's subscriptions: one no function holds (left by an
    earlier run; the daemon's record of them lost) brings events that no function takes. Each is
    answered on edgefn/errors/unrouted, counted; the log says so once per topic; /healthz says why."""
    settings = settings_for(broker, digits_fn)
    stale = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    stale.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
    stale.loop_start()
    subscribed = stale.subscribe("meters/#", qos=1)
    assert eventually(lambda: stale.is_connected(), 5) and subscribed[0] == mqtt.MQTT_ERR_SUCCESS
    time.sleep(0.2)  # the SUBACK
    stale.disconnect()
    stale.loop_stop()
    errors, results = collector(UNROUTED_TOPIC), collector("results/+/digits")
    with caplog.at_level(logging.WARNING, logger="edgefn.dispatch"):
        d = started(settings)
        publish(broker.port, "meters/m1/kwh", [json.dumps({"id": f"kwh-{i}", "kwh": i}).encode() for i in range(5)])
        publish(broker.port, "sensors/dev1/digits", digit_payloads(1, "still")[0])
        got = errors.wait_for(5)
        assert len(got) == 5, f"{len(got)} of 5 unrouted events answered on {UNROUTED_TOPIC}"
        assert [t for t, _ in got] == [UNROUTED_TOPIC] * 5
        first = got[0][1]
        assert first["reason"] == "unrouted" and first["topic"] == "meters/m1/kwh" and first["event_id"] == "kwh-0"
        assert first["function"] is None and "matches no trigger" in first["error"] and "sensors/+/digits" in first["error"]
        assert all(p.get("edgefn-event") for p in errors.properties), "answered through the outbox, like any error"
        assert [doc["event_id"] for _, doc in results.wait_for(1)] == ["still-0"], "the rest still served"
        assert counter(d, "edgefn_events_unrouted_total") == 5
        health = d.health()
        assert health["status"] == "degraded", health
        assert "5 events went to no function" in health["problem"] and "meters/m1/kwh" in health["problem"]
        assert health["unrouted"]["events"] == 5 and health["unrouted"]["last_topic"] == "meters/m1/kwh"
        assert eventually(lambda: d.inbox.pending() == [], 5), "answered: they leave the inbox"
    lines = [r.getMessage() for r in caplog.records if "went to no function" in r.getMessage()]
    assert len(lines) == 1 and "meters/m1/kwh" in lines[0] and UNROUTED_TOPIC in lines[0], lines
