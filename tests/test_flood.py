"""A flood of one function past its budget in the journal: its neighbour's events neither wait behind it
nor get lost, and every flood event is answered (a result, or an error with reason shed), against a real
mosquitto and real components; and how the budgets share the inbox's bound (by weight, low priority shed
first)."""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally

import pytest

from edgefn.dispatch.lanes import Lane, LoadedFunction
from edgefn.dispatch.router import Router
from edgefn.dispatch.share import Share
from edgefn.events import Event
from edgefn.functions.manifest import Manifest
from edgefn.observe.window import HealthWindow
from edgefn.offload.planner import Planner
from tests.conftest import eventually, publish
from tests.test_daemon import digit_payloads
from tests.test_share import counter


class Sandbox:
    def close(self) -> None:
        pass


def function(name: str, *topics: str, weight: float = 1.0, **trigger: object) -> LoadedFunction:
    manifest = Manifest.model_validate({"function": {"name": name, "version": "1"},
                                        "trigger": {"topics": list(topics), **trigger},
                                        "limits": {"journal_weight": weight}})
    return LoadedFunction(manifest, Sandbox(), [], Planner("never", 100, 1),  # type: ignore[arg-type]
                          {"local": Lane("local", 1)}, HealthWindow(), Share(10, 1 << 20))


def events(topic: str, n: int, first: int = 0) -> list[Event]:
    return [Event(str(i), topic, b"x", time.time() * 1000) for i in range(first, first + n)]


def test_a_function_alone_has_no_budget_and_its_events_wait_for_room_instead():
    fn = function("f", "s/x")
    shed: list[str] = []
    router = Router([fn], lambda: False, lambda p: None, lambda e, p: None,
                    shed=lambda e, p, f: shed.append(e.topic), journal=(400, 1 << 30))
    router.deliver(events("s/x", 1000))
    assert shed == [] and len(fn.share.parked) + fn.share.events == 1000


def test_budgets_share_the_inbox_bound_by_weight_and_past_it_events_are_shed():
    """Budgets: three quarters of the bound by weight (1,000 events: 250 and 500); past its budget a function's
    new events go to `shed`, the rest of the daemon's still to their lanes."""
    heavy, light = function("heavy", "a/#", weight=2), function("light", "b/#")
    shed: list[tuple[str, str]] = []
    router = Router([heavy, light], lambda: False, lambda p: None, lambda e, p: None,
                    shed=lambda e, p, fn: shed.append((fn.name, e.id)), journal=(1000, 1 << 30))
    assert (heavy.share.budget_events, light.share.budget_events) == (500, 250)
    router.deliver(events("b/x", 300))
    assert len(light.share.parked) + light.share.events == 250 and len(shed) == 50
    assert {name for name, _ in shed} == {"light"} and shed[0] == ("light", "250"), "the newest are shed, in order"
    router.deliver(events("a/x", 10, first=300))
    assert heavy.share.events == 10, "the other function is not held by the first one's flood"


def test_low_priority_events_are_shed_first_leaving_room_for_high_ones():
    """Low-priority events from three quarters of the budget, normal ones from the budget, high ones past
    a quarter more: a flood of low-priority events leaves the function room for its alarms."""
    fn = function("f", "s/low", "s/normal", "s/high", priorities={"s/low": "low", "s/high": "high"})
    neighbour = function("g", "t/other")  # a function alone has no budget: nobody waits behind it
    shed: list[str] = []
    router = Router([fn, neighbour], lambda: False, lambda p: None, lambda e, p: None,
                    shed=lambda e, p, f: shed.append(e.topic), journal=(800, 1 << 30))  # budget 300 each
    router.deliver(events("s/low", 400))
    assert Tally(shed) == {"s/low": 175}, "low-priority events take 225 of 300"
    router.deliver(events("s/normal", 100, first=400))
    assert Tally(shed)["s/normal"] == 25
    router.deliver(events("s/high", 100, first=500))
    assert Tally(shed)["s/high"] == 25 and len(fn.share.parked) + fn.share.events == 375


@pytest.mark.broker
def test_a_flood_past_its_budget_neither_delays_nor_loses_the_neighbours_events(
        broker, settings_for, started, digits_fn, hostile_fn, collector, caplog):
    """hostile, one instance, flooded with 200 events that each spin to its 300 ms deadline (a minute's
    work; each payload different, so that none is quarantined), beside digits. With an inbox bound of
    80 events (budgets of 30 each), hostile's events past its budget are answered at once with reason
    shed: digits' events, published after the flood, are answered within seconds (before: held behind the
    flood at the inbox's bound, a minute), and every flood event is answered, 200 answers in all."""
    results, flood_answers = collector("results/+/digits"), collector("edgefn/errors/hostile", "results/+/hostile")
    with caplog.at_level(logging.WARNING, logger="edgefn.dispatch"):
        d = started(settings_for(broker, digits_fn, hostile_fn, inbox_max_events=80))
        publish(broker.port, "sensors/dev1/hostile", [b" " * k + b"loop" for k in range(200)])
        payloads, labels = digit_payloads(20, "neighbour")
        start = time.monotonic()
        publish(broker.port, "sensors/dev1/digits", payloads)
        got = results.wait_for(20, timeout=20)
        took = time.monotonic() - start
        assert sorted(doc["event_id"] for _, doc in got) == sorted(labels), f"{len(got)} of 20 answered in {took:.0f} s"
        assert took < 10, f"the neighbour's events took {took:.1f} s behind the flood"
        answers = flood_answers.wait_for(200, timeout=60)
        reasons = Tally(doc["reason"] for _, doc in answers if isinstance(doc, dict))
        assert len(answers) == 200, f"{len(answers)} of 200 flood events answered: {reasons}"
        assert reasons["shed"] >= 150 and set(reasons) <= {"shed", "timeout", "quarantined"}, reasons
        shed = next(doc for _, doc in answers if doc["reason"] == "shed")
        assert shed["function"] == "hostile" and "budget in the journal" in shed["error"], shed
        assert counter(d, 'edgefn_events_handled_total{function="hostile",outcome="shed"}') == reasons["shed"]
        assert eventually(lambda: d.inbox.pending() == [], 10), "answered: they leave the journal"
        assert not d.ingress.paused and d.ingress.held == 0
    lines = [r.getMessage() for r in caplog.records if "past its budget in the journal" in r.getMessage()]
    assert len(lines) == 1, "one line per 10 s, not a line per shed event"


@pytest.mark.broker
def test_a_functions_answer_does_not_wait_behind_another_functions_backlog_of_answers(broker, collector):
    """Egress, a real paho client and mosquitto: 300 answers of a flooded function queued (the window
    closed, as behind a broker that takes 20 at a time), then one of its neighbour's: with a window of
    one, the neighbour's answer goes out second, not 301st; each function's own answers keep their order."""
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefn.mqtt.client import PausableClient
    from edgefn.mqtt.egress import Egress
    from edgefn.mqtt.limits import BrokerLimits
    from edgefn.protocol.outputs import FUNCTION

    got = collector("answers/#")
    client = PausableClient(CallbackAPIVersion.VERSION2, client_id=f"egress-{time.monotonic_ns()}", protocol=5)
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    egress = Egress(client, lambda why: None)
    client.on_publish = lambda _c, _u, mid, reason, _p: egress.acknowledged(mid, None)
    connected = []
    client.on_connect = lambda *_a: connected.append(True)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert eventually(lambda: connected, 5)
        acked: list[str | None] = []
        for i in range(300):
            egress.publish("answers/flood", b"%d" % i, acked.append, [(FUNCTION, "flood@1")])
        egress.publish("answers/neighbour", b"n", acked.append, [(FUNCTION, "neighbour@1")])
        egress.take_back(BrokerLimits(receive_maximum=1))
        egress.pump()
        messages = got.wait_for(301, timeout=30)
        assert len(messages) == 301 and acked == [None] * 301
        order = [topic for topic, _ in messages]
        assert order.index("answers/neighbour") <= 1, f"the neighbour's answer went out at {order.index('answers/neighbour')}"
        assert [doc for topic, doc in messages if topic == "answers/flood"] == list(range(300)), "in order"
    finally:
        client.loop_stop()
        client.disconnect()
