"""The dispatch pieces alone, without a broker: the reorder buffer, batch taking, routing, the drain
hand-over of a release swap, and the outbox's bookkeeping."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

from edgefn.dispatch import unrouted as unrouted_module
from edgefn.dispatch.lanes import Lane, LoadedFunction, hand_over, retire
from edgefn.dispatch.order import InOrder
from edgefn.dispatch.router import Router
from edgefn.dispatch.share import Share
from edgefn.dispatch.unrouted import Unrouted
from edgefn.dispatch.worker import take
from edgefn.events import Event, Message
from edgefn.functions.manifest import Manifest
from edgefn.journal.inbox import Inbox
from edgefn.journal.outbox import Outbox, Pending
from edgefn.observe.metrics import Metrics
from edgefn.observe.window import HealthWindow
from edgefn.offload.planner import Planner


def event(i: int, topic: str = "sensors/a/x") -> Event:
    return Event(str(i), topic, b"%d" % i, time.time() * 1000)


class Sandbox:
    """Stands in for a FunctionSandbox where nothing runs in it: only close() is called."""

    closed = False

    def close(self) -> None:
        self.closed = True


def function(name: str = "f", topics: tuple[str, ...] = ("sensors/+/x",), workers: int = 1,
             share: tuple[int, int] = (1000, 1 << 20), **trigger: object) -> LoadedFunction:
    manifest = Manifest.model_validate({"function": {"name": name, "version": "1"},
                                        "trigger": {"topics": list(topics), **trigger}})
    return LoadedFunction(manifest, Sandbox(), [], Planner("never", 100, workers),  # type: ignore[arg-type]
                          {"local": Lane("local", workers)}, HealthWindow(), Share(*share))


def queued(fn: LoadedFunction) -> list[str]:
    return [item[0].id for item in list(fn.local.queue.queue)]


# -- the reorder buffer ---------------------------------------------------------------------------------
def test_in_order_publishes_in_ticket_order_whatever_the_release_order():
    order, q, published = InOrder(), queue.Queue(), []
    for i in range(5):
        order.queue(q, (i,))
    tickets = [q.get()[1] for _ in range(5)]
    assert tickets == [0, 1, 2, 3, 4]
    for ticket in (3, 1, 4):
        order.release(ticket, lambda t=ticket: published.append(t))
    assert published == [] and order.waiting == 3
    order.release(0, lambda: published.append(0))
    assert published == [0, 1]
    order.release(2, lambda: published.append(2))
    assert published == [0, 1, 2, 3, 4] and order.waiting == 0


def test_in_order_runs_each_ticket_once_and_a_given_up_ticket_publishes_nothing():
    order, q, published = InOrder(), queue.Queue(), []
    for i in range(3):
        order.queue(q, (i,))
    order.release(1, lambda: published.append(1))
    order.release(1, lambda: published.append("again"))
    order.release(0)  # given up: nothing to publish, the next may go
    order.release(0, lambda: published.append("late"))
    order.release(2, lambda: published.append(2))
    assert published == [1, 2]


def test_in_order_never_publishes_under_its_lock():
    """A publish that blocks (the broker slow to acknowledge) must not hold up other workers queueing or
    releasing: the deadlock found under overload came from a publish made under this lock."""
    order, q = InOrder(), queue.Queue()
    for i in range(3):
        order.queue(q, (i,))
    gate, published = threading.Event(), []

    def blocking() -> None:
        gate.wait(10)
        published.append(0)

    worker = threading.Thread(target=order.release, args=(0, blocking))
    worker.start()
    time.sleep(0.05)  # the worker now blocks in its publish
    done = threading.Event()

    def other() -> None:
        order.queue(q, (3,))  # a new event queued...
        order.release(1, lambda: published.append(1))  # ...and an answer released, both without waiting
        done.set()

    threading.Thread(target=other).start()
    assert done.wait(2), "queue/release waited for a blocked publish"
    assert published == []
    gate.set()
    worker.join(5)
    assert published == [0, 1], "the blocked worker drained what was released meanwhile, in order"


def test_in_order_keeps_order_with_many_workers():
    order, q, published = InOrder(), queue.Queue(), []
    n = 2000
    for i in range(n):
        order.queue(q, (i,))
    items = [q.get() for _ in range(n)]

    def work(mine: list) -> None:
        for _, ticket in mine:
            order.release(ticket, lambda t=ticket: published.append(t))

    threads = [threading.Thread(target=work, args=(items[k::4][::-1] if k % 2 else items[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert published == list(range(n))


# -- taking a batch -------------------------------------------------------------------------------------
def test_take_returns_what_queued_up_to_max_batch():
    q = queue.Queue()
    items = [(event(i), None, i) for i in range(5)]
    for item in items:
        q.put(item)
    assert take(q, 3) == items[:3]
    assert take(q, 3) == items[3:]


def test_take_closes_a_batch_past_its_bytes():
    q = queue.Queue()
    for i in range(4):
        q.put((Event(str(i), "t", b"x" * 40_000, 0.0), None, i))
    assert [item[2] for item in take(q, 32, max_bytes=64 * 1024)] == [0, 1], "two events reach 80 kB"
    q.put((Event("9", "t", b"x" * 1_000_000, 0.0), None, 9))
    assert [item[2] for item in take(q, 32, max_bytes=64 * 1024)] == [2, 3]
    assert [item[2] for item in take(q, 32, max_bytes=64 * 1024)] == [9], "a large event alone"


def test_take_stops_at_the_stop_mark_and_leaves_it_for_the_next_worker():
    q = queue.Queue()
    items = [(event(i), None, i) for i in range(2)]
    for item in (*items, None):
        q.put(item)
    assert take(q, 10) == items
    assert take(q, 10) is None
    assert take(q, 10) is None, "every worker of the lane sees the stop mark"
    assert q.get_nowait() is None


# -- routing --------------------------------------------------------------------------------------------
def test_router_delivers_to_each_triggered_function_and_answers_unrouted_events():
    a, b = function("a", ("sensors/+/x",)), function("b", ("sensors/#",))
    done: list[Pending] = []
    unrouted: list[tuple[str, Pending]] = []
    router = Router([a, b], lambda: False, done.append, lambda e, p: unrouted.append((e.topic, p)))
    router.deliver([event(1, "sensors/one/x"), event(2, "sensors/one/y"), event(3, "other/z")])
    assert [item[0].id for item in list(a.local.queue.queue)] == ["1"]
    assert [item[0].id for item in list(b.local.queue.queue)] == ["1", "2"]
    shared = a.local.queue.queue[0][1]
    assert shared is b.local.queue.queue[0][1] and shared.functions == 2, "one pending entry per event"
    assert [(t, p.event_id, p.functions) for t, p in unrouted] == [("other/z", "3", 1)], "answered once, as unrouted"
    assert done == []
    assert router.filters() == {"normal": ["sensors/#", "sensors/+/x"]}, "all normal: one class, one session"


def test_router_matches_a_shared_subscription_by_its_filter_and_subscribes_it_whole():
    """`$share/GROUP/FILTER`: the broker sends each event with its own topic (sensors/one/x), never the
    trigger as written; matched as written, every event went to no function."""
    a = function("a", ("$share/g1/sensors/+/x",))
    unrouted: list[str] = []
    router = Router([a], lambda: False, lambda p: None, lambda e, p: unrouted.append(e.topic))
    router.deliver([event(1, "sensors/one/x"), event(2, "sensors/one/y")])
    assert queued(a) == ["1"] and unrouted == ["sensors/one/y"]
    assert router.filters() == {"normal": ["$share/g1/sensors/+/x"]}


def test_router_answers_nothing_for_a_copy_another_priority_session_takes():
    """A topic a function takes at high priority comes on the high session and, through a broader low
    filter, on the low one too: the low copy is done without a word, not unrouted."""
    fn = function("f", ("sensors/#", "sensors/+/alarm"), priority="low", priorities={"sensors/+/alarm": "high"})
    done: list[str] = []
    unrouted: list[str] = []
    router = Router([fn], lambda: False, lambda p: done.append(p.event_id), lambda e, p: unrouted.append(e.id))
    low = [Event("1", "sensors/a/alarm", b"", 0.0, priority="low"), Event("2", "other", b"", 0.0, priority="low")]
    router.deliver(low)
    assert done == ["1"] and unrouted == ["2"] and queued(fn) == []


def test_unrouted_events_are_answered_counted_logged_once_per_topic_and_said(caplog, monkeypatch):
    answered: list[tuple[str, list[Message]]] = []
    done: list[str] = []
    metrics = Metrics()
    unrouted = Unrouted(lambda p, messages, props: answered.append((p.event_id, messages)),
                        lambda p: done.append(p.event_id), metrics, lambda: ["$share/g1/sensors/+/x"])
    assert unrouted.problem() is None and unrouted.snapshot() is None
    with caplog.at_level(logging.WARNING, logger="edgefn.dispatch"):
        for i, topic in enumerate(["other/a", "other/a", "other/b", "other/a", "edgefn/errors/digits"]):
            unrouted(Event(str(i), topic, b'{"id": "s%d"}' % i, 0.0), Pending(str(i), False, 0, 1))
    assert [event_id for event_id, _ in answered] == ["0", "1", "2", "3"]
    assert done == ["4"], "an event on an error topic answers nothing: its answer would come back to it"
    message = answered[0][1][0]
    body = json.loads(message.payload)
    assert message.topic == "edgefn/errors/unrouted" and (message.qos, message.retain) == (1, False)
    assert (body["event_id"], body["topic"], body["reason"], body["function"]) == ("s0", "other/a", "unrouted", None)
    assert "other/a matches no trigger" in body["error"] and "$share/g1/sensors/+/x" in body["error"]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" went")[0] for line in lines] == ["event 0 on other/a", "event 2 on other/b",
                                                         "event 4 on edgefn/errors/digits"], "a line per topic"
    assert "edgefn_events_unrouted_total 5.0" in metrics.render().decode()
    assert "5 events went to no function" in (unrouted.problem() or "")
    assert unrouted.snapshot()["last_topic"] == "edgefn/errors/digits"
    later = time.monotonic() + unrouted_module.HEALTH_S + 1
    monkeypatch.setattr(unrouted_module.time, "monotonic", lambda: later)
    assert unrouted.problem() is None, "healthy again once none has come for a while"


def test_router_swap_starts_the_topic_cache_afresh():
    a, b = function("a", ("sensors/+/x",)), function("b", ("sensors/+/x",))
    router = Router([a], lambda: False, lambda p: None, lambda e, p: None)
    assert router.route("sensors/1/x") == [a]
    with router.swap():
        router.functions = [b]
    assert router.route("sensors/1/x") == [b]


# -- the drain hand-over of a swap ----------------------------------------------------------------------
def test_hand_over_moves_what_the_old_function_holds_to_the_new_one_in_order():
    old, new, gone = function("f", share=(2, 1 << 20)), function("f"), function("g")
    for i in range(4):  # two in the lane, two parked past the share
        old.offer(event(i), Pending.of(event(i), 1), False)
    assert queued(old) == ["0", "1"] and len(old.share.parked) == 2
    gone.offer(event(9), Pending.of(event(9), 1), False)
    nothing: list[tuple[str, str]] = []
    hand_over([old, gone], {"f": new}, lambda pending, fn: nothing.append((pending.event_id, fn.name)))
    assert [p.event_id for p in new.share.parked] == ["0", "1", "2", "3"], "parked with the new one, in order"
    assert nothing == [("9", "g")], "a function the new release lacks answers with nothing"
    assert old.local.queue.unfinished_tasks == 0 and not old.share.parked and gone.local.queue.unfinished_tasks == 0
    new.refill(lambda ids: [event(int(i)) for i in ids], False)
    assert queued(new) == ["0", "1", "2", "3"]
    assert [item[2] for item in list(new.local.queue.queue)] == [0, 1, 2, 3], "new tickets in the new lane's order"


def test_retire_hands_over_past_the_deadline_and_closes_the_old_sandboxes():
    old, new = function("f"), function("f")
    old.offer(event(1), Pending.of(event(1), 1), False)  # no worker takes it: the old function is stuck
    stuck = threading.Thread(target=lambda: None)
    stuck.start()
    old.workers.append(stuck)
    retire([old], [new], drain_timeout=0.05, answer_nothing=lambda p, f: None)
    assert [p.event_id for p in new.share.parked] == ["1"]
    assert old.sandbox.closed


# -- the outbox's bookkeeping ---------------------------------------------------------------------------
class Broker:
    """Stands in for Connection.publish: records publishes; PUBACKs are given by the test."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, object, list, int, bool]] = []

    def publish(self, topic, payload, on_acked, props, qos, retain, urgent=False) -> None:
        self.sent.append((topic, payload, on_acked, list(props), qos, retain))


def test_outbox_settles_answered_events_and_keeps_unacknowledged_outputs(tmp_path: Path):
    store, broker, settled = Inbox(tmp_path / "inbox.sqlite"), Broker(), []
    outbox = Outbox(store, broker.publish, Metrics(), on_settled=lambda n, b: settled.append((n, b)))
    first, second = store.append("sensors/a/x", b"11"), store.append("sensors/a/x", b"2")
    two_functions = Pending.of(first, 2)
    outbox.answer(two_functions, [Message("results/a", b"r1")], [("edgefn-function", "f@1")])
    assert outbox.unsettled() == 0, "one of two functions answered: the event stays"
    outbox.answer(two_functions, [Message("results/b", b"r2")], [])
    outbox.answer(Pending.of(second, 1), [], [])
    assert outbox.awaiting_ack == 2
    assert broker.sent[0][3] == [("edgefn-event", first.id), ("edgefn-function", "f@1")]
    broker.sent[0][2](None)  # r1 acknowledged before the settle, r2 not
    outbox.settle()
    assert settled == [(2, 3)] and len(store) == 0
    assert [m.topic for _, _, m in store.outbox()] == ["results/b"] and outbox.rows == 1
    broker.sent[1][2](None)  # r2 acknowledged after the settle: its row leaves at the next one
    outbox.settle()
    assert store.outbox() == [] and outbox.rows == 0 and outbox.awaiting_ack == 0


def test_outbox_replays_unsent_outputs_marked_as_possible_duplicates(tmp_path: Path):
    store, broker = Inbox(tmp_path / "inbox.sqlite"), Broker()
    e = store.append("sensors/a/x", b"1")
    rows = store.settle([e.id], [(e.id, Message("results/a", b"r")),
                                 (e.id, Message("alerts/a", b"hot", 0, True, (("severity", "high"),)))])
    outbox = Outbox(store, broker.publish, Metrics(), on_settled=lambda n, b: None, rows=2)
    outbox.replay(store.outbox())
    assert broker.sent[0][3:] == ([("edgefn-event", e.id), ("edgefn-duplicate", "possible")], 1, False)
    # The function's own properties follow edgefn's, and its QoS and retain flag come back from the outbox.
    assert broker.sent[1][3:] == ([("edgefn-event", e.id), ("edgefn-duplicate", "possible"), ("severity", "high")], 0, True)
    broker.sent[1][2](None)
    broker.sent[0][2]("not authorized")  # refused: it stays in the outbox
    outbox.settle()
    assert [r for r, _, _ in store.outbox()] == rows[:1]


# -- a function's share of memory -------------------------------------------------------------------------
def test_past_its_share_a_function_parks_events_and_reads_them_back_in_order():
    fn = function(share=(3, 1 << 20))
    journal = {str(i): event(i) for i in range(10)}
    for i in range(10):
        fn.offer(journal[str(i)], Pending.of(journal[str(i)], 1), False)
    assert queued(fn) == ["0", "1", "2"] and len(fn.share.parked) == 7
    fn.refill(lambda ids: [journal[i] for i in ids], False)
    assert queued(fn) == ["0", "1", "2"], "no room yet: nothing read"
    for _ in range(2):
        fn.local.queue.get_nowait()
    fn.share.freed(2, 2)
    fn.refill(lambda ids: [journal[i] for i in ids], False)
    assert queued(fn) == ["2", "3", "4"] and len(fn.share.parked) == 5


def test_share_counts_bytes_and_always_takes_one_event_when_empty():
    fn = function(share=(100, 1000))
    big = Event("1", "sensors/a/x", b"x" * 5000, 0.0)
    fn.offer(big, Pending.of(big, 1), False)
    assert queued(fn) == ["1"], "an event larger than the share still runs, alone"
    small = Event("2", "sensors/a/x", b"y", 0.0)
    fn.offer(small, Pending.of(small, 1), False)
    assert [p.event_id for p in fn.share.parked] == ["2"] and fn.share.bytes == 5000


def test_a_flood_of_one_function_does_not_hold_up_another():
    flooded, quiet = function("a", ("flood/#",), share=(5, 1 << 20)), function("b", ("quiet/#",))
    router = Router([flooded, quiet], lambda: False, lambda p: None, lambda e, p: None)
    router.deliver([event(i, "flood/x") for i in range(1000)] + [event(1000, "quiet/x")])
    assert len(queued(flooded)) == 5 and len(flooded.share.parked) == 995
    assert queued(quiet) == ["1000"], "the quiet function's event is in its lane at once"


def test_replay_parks_everything_and_refill_reads_the_payloads_back():
    fn = function(share=(2, 1 << 20))
    router = Router([fn], lambda: False, lambda p: None, lambda e, p: None)
    router.replay([(Event(str(i), "sensors/a/x", b"", 0.0, replayed=True), 1) for i in range(3)])
    assert queued(fn) == [] and len(fn.share.parked) == 3
    fn.refill(lambda ids: [event(int(i)) for i in ids], False)
    items = list(fn.local.queue.queue)
    assert [(e.id, e.payload, e.replayed) for e, _, _ in items] == [("0", b"0", True), ("1", b"1", True)]


def test_a_workers_outcome_and_latency_series_are_looked_up_once_per_function_and_outcome():
    """prometheus's labels() (a lock, its labels checked) on each event was a cost of every answer: the
    series are kept, and what they count is the same."""
    from edgefn.dispatch.worker import Workers
    from edgefn.errors import Shed

    metrics = Metrics()
    looked_up: list[tuple[str, ...]] = []
    for metric in (metrics.events_handled, metrics.event_seconds):
        labels = metric.labels

        def counted(*values: str, _labels=labels) -> object:
            looked_up.append(values)
            return _labels(*values)

        metric.labels = counted  # type: ignore[method-assign]
    workers = Workers(1 << 20, metrics, lambda *a: None, refill=lambda fn: None)
    fn = function()
    for i in range(100):
        workers.outputs(fn, event(i), [] if i % 10 else Shed("shed"))
    assert sorted(looked_up) == [("f",), ("f", "ok"), ("f", "shed")]
    assert metrics.events_handled.labels("f", "ok")._value.get() == 90
    assert metrics.events_handled.labels("f", "shed")._value.get() == 10
