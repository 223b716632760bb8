"""Ingress: commit before acknowledging, group commits, backpressure past the bound."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from edgefn.journal.inbox import Inbox
from edgefn.mqtt.ingress import GROUP, Ingress


class Wire:
    """What the broker connection offers ingress: acknowledgements and a peek at the socket."""

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self.acked: list[int] = []
        self.durable_when_acked: list[int] = []
        self.waiting = False

    def ack(self, mid: int, qos: int, priority: str = "normal") -> None:
        assert qos >= 1, "a QoS 0 message has no acknowledgement"
        self.acked.append(mid)
        self.durable_when_acked.append(len(self.inbox))


def make(tmp_path: Path, max_events: int = 100) -> tuple[Ingress, Wire, list]:
    inbox = Inbox(tmp_path / "inbox.sqlite")
    wire, delivered = Wire(inbox), []
    ingress = Ingress(inbox, max_events, delivered.extend, wire.ack, lambda: wire.waiting)
    return ingress, wire, delivered


def test_ingress_acknowledges_only_what_is_committed(tmp_path: Path):
    ingress, wire, delivered = make(tmp_path)
    ingress.on_message("sensors/a/x", b"1", 11, 1, False)
    assert wire.acked == [11] and wire.durable_when_acked == [1]
    assert [e.payload for e in delivered] == [b"1"]


def test_ingress_groups_events_that_arrive_together(tmp_path: Path):
    ingress, wire, delivered = make(tmp_path, max_events=10_000)
    wire.waiting = True  # more bytes on the socket: keep the group open
    for mid in range(1, 6):
        ingress.on_message("t", b"x", mid, 1, False)
    assert wire.acked == [] and delivered == []
    wire.waiting = False
    ingress.on_message("t", b"x", 6, 1, False)
    assert wire.acked == [1, 2, 3, 4, 5, 6] and len(delivered) == 6
    wire.waiting = True
    for mid in range(GROUP):
        ingress.on_message("t", b"y", 100 + mid, 1, False)
    assert len(wire.acked) == 6 + GROUP  # a full group is flushed even while more is waiting
    ingress.on_message("t", b"z", 999, 1, False)
    ingress.flush()  # the timer's flush
    assert wire.acked[-1] == 999


def test_ingress_holds_events_past_the_bound_unacknowledged(tmp_path: Path):
    ingress, wire, delivered = make(tmp_path, max_events=3)
    for mid in range(1, 7):
        ingress.on_message("t", str(mid).encode(), mid, 1, False)
    assert wire.acked == [1, 2, 3] and ingress.held == 3
    ingress.answered(2)
    assert wire.acked == [1, 2, 3, 4, 5] and ingress.held == 1
    assert [e.payload for e in delivered] == [b"1", b"2", b"3", b"4", b"5"]


def test_ingress_after_close_takes_nothing_and_leaves_held_to_the_broker(tmp_path: Path):
    ingress, wire, delivered = make(tmp_path, max_events=1)
    ingress.on_message("t", b"a", 1, 1, False)
    ingress.on_message("t", b"b", 2, 1, False)  # held
    ingress.close()
    ingress.on_message("t", b"c", 3, 1, False)
    ingress.answered(1)
    assert wire.acked == [1] and len(delivered) == 1


def test_ingress_disconnect_forgets_what_the_broker_will_redeliver(tmp_path: Path):
    ingress, wire, delivered = make(tmp_path, max_events=1)
    ingress.on_message("t", b"a", 1, 1, False)
    ingress.on_message("t", b"b", 2, 1, False)  # held: past the bound
    ingress.disconnected()
    ingress.answered(1)
    assert wire.acked == [1] and ingress.held == 0 and len(delivered) == 1


class FailingOnce:
    """An inbox whose first commit fails (a full disk), then recovers."""

    taking = True  # as far as ingress can tell beforehand

    def __init__(self, inbox: Inbox):
        self.inbox, self.failed = inbox, False

    def append_many(self, items):
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        return self.inbox.append_many(items)


def test_ingress_journal_failure_acknowledges_nothing_and_retries(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    wire, delivered = Wire(inbox), []
    ingress = Ingress(FailingOnce(inbox), 100, delivered.extend, wire.ack, lambda: False)
    ingress.on_message("t", b"a", 7, 1, False)
    assert wire.acked == [] and delivered == [] and len(inbox) == 0
    ingress.flush()
    assert wire.acked == [7] and [e.payload for e in delivered] == [b"a"] and len(inbox) == 1


def test_ingress_holds_events_past_the_byte_bound(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    wire, delivered = Wire(inbox), []
    ingress = Ingress(inbox, 1000, delivered.extend, wire.ack, lambda: False, max_bytes=250)
    for mid in range(1, 5):
        ingress.on_message("t", b"x" * 100, mid, 1, False)
    assert wire.acked == [1, 2] and ingress.held == 2 and ingress.outstanding_bytes == 200
    ingress.answered(1, 100)
    assert wire.acked == [1, 2, 3] and ingress.held == 1


def test_ingress_takes_one_event_larger_than_the_byte_bound_when_empty(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    wire, delivered = Wire(inbox), []
    ingress = Ingress(inbox, 1000, delivered.extend, wire.ack, lambda: False, max_bytes=10)
    ingress.on_message("t", b"x" * 100, 1, 1, False)  # never stuck behind its own size
    assert wire.acked == [1]


def test_ingress_journals_qos0_events_without_acknowledging_them(tmp_path: Path):
    ingress, wire, delivered = make(tmp_path)
    ingress.on_message("t", b"a", 0, 0, False)  # QoS 0: paho reports mid 0
    ingress.on_message("t", b"b", 5, 1, False)
    assert wire.acked == [5] and [e.payload for e in delivered] == [b"a", b"b"] and len(wire.inbox) == 2


def test_ingress_keeps_held_qos0_events_across_a_disconnect_and_journals_them_on_close(tmp_path: Path):
    ingress, wire, delivered = make(tmp_path, max_events=1)
    ingress.on_message("t", b"a", 1, 1, False)
    ingress.on_message("t", b"b", 0, 0, False)  # held: the broker keeps no copy
    ingress.on_message("t", b"c", 2, 1, False)  # held: the broker redelivers it
    ingress.disconnected()
    assert ingress.held == 1
    ingress.close()
    assert wire.acked == [1] and [e.payload for e in delivered] == [b"a", b"b"]


def test_ingress_drops_qos0_events_past_the_bound_and_says_so_once(tmp_path: Path, caplog):
    ingress, wire, delivered = make(tmp_path, max_events=2)
    for _ in range(10):
        ingress.on_message("t", b"x", 0, 0, False)
    assert len(delivered) == 2 and ingress.held == 2 and ingress.dropped_qos0 == 6
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1


def test_ingress_logs_a_failing_journal_once_per_interval(tmp_path: Path, caplog):
    class Full:
        taking = True

        def append_many(self, items):
            raise sqlite3.OperationalError("database or disk is full")

    ingress = Ingress(Full(), 100, [].extend, Wire(Inbox(tmp_path / "i.sqlite")).ack, lambda: False)
    ingress.on_message("t", b"a", 7, 1, False)
    for _ in range(50):
        ingress.flush()  # the timer's flush, every few milliseconds
    assert len([r for r in caplog.records if "cannot journal" in r.getMessage()]) == 1


def test_ingress_stops_reading_past_the_held_bytes_and_resumes_at_half(tmp_path: Path):
    """Held payloads are bounded in bytes: 4,000 payloads of 250 kB once took the daemon to 2.6 GB."""
    inbox = Inbox(tmp_path / "inbox.sqlite")
    wire, delivered, pauses = Wire(inbox), [], []
    ingress = Ingress(inbox, 1, delivered.extend, wire.ack, lambda: wire.waiting, max_held_bytes=3000,
                      pause=pauses.append)
    ingress.on_message("sensors/a/x", b"x" * 1000, 1, 1, False)  # in the inbox, which is now full
    for mid in range(2, 6):
        ingress.on_message("sensors/a/x", b"x" * 1000, mid, 1, False)  # held: 4,000 bytes past 3,000
    assert pauses == [True] and ingress.paused and ingress.held == 4
    for _ in range(2):  # each answer makes room for one held event: 3,000 then 2,000 bytes held
        ingress.answered(1, 1000)
    assert pauses == [True], "still over half the bound: no flapping"
    ingress.answered(1, 1000)
    assert pauses == [True, False] and not ingress.paused, "resumed at half the bound"
    assert wire.acked == [1, 2, 3, 4]


def test_ingress_journals_only_the_head_of_an_oversized_payload(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    wire, delivered = Wire(inbox), []
    ingress = Ingress(inbox, 100, delivered.extend, wire.ack, lambda: wire.waiting, max_payload_bytes=2000)
    big = b'{"id": "big", "pad": "' + b"x" * 1_000_000 + b'"}'
    ingress.on_message("sensors/a/x", big, 7, 1, False)
    assert wire.acked == [7]
    (event,) = delivered
    assert event.dropped == len(big) and len(event.payload) <= 1024 and event.payload == big[:len(event.payload)]
    (journaled,) = inbox.pending()
    assert journaled.dropped == len(big) and len(journaled.payload) <= 1024
    assert ingress.outstanding_bytes <= 1024, "the inbox's byte bound counts what is kept"


def test_ingress_delivers_outside_its_lock(tmp_path: Path):
    """Delivery may wait (a swap holds routing); paho's thread must not wait behind it for the lock."""
    import threading

    inbox = Inbox(tmp_path / "inbox.sqlite")
    wire, entered, release = Wire(inbox), threading.Event(), threading.Event()

    def slow_deliver(events):
        entered.set()
        release.wait(5)

    ingress = Ingress(inbox, 100, slow_deliver, wire.ack, lambda: wire.waiting)
    first = threading.Thread(target=ingress.on_message, args=("sensors/a/x", b"1", 1, 1, False))
    first.start()
    assert entered.wait(5)
    second = threading.Thread(target=ingress.on_message, args=("sensors/a/x", b"2", 2, 1, False))
    second.start()
    second.join(2)
    assert not second.is_alive(), "the second event waited for the first one's delivery"
    assert wire.acked == [1, 2]
    release.set()
    first.join(5)


def test_ingress_holds_events_while_the_journal_is_at_its_byte_budget(tmp_path: Path):
    """The journal's budget on disk holds ingress as a full disk does: nothing acknowledged past it,
    the rest taken in as answers make room."""
    inbox = Inbox(tmp_path / "inbox.sqlite", max_bytes=6 * 1024 * 1024)
    wire, delivered = Wire(inbox), []
    ingress = Ingress(inbox, 10_000, delivered.extend, wire.ack, lambda: False)  # no bound of its own in reach
    for mid in range(1, 101):  # 10 MB
        ingress.on_message("t", os.urandom(100_000), mid, 1, False)
    journaled = len(inbox)
    assert 20 < journaled < 60 and not inbox.taking
    assert wire.acked == list(range(1, journaled + 1)) and ingress.held >= 100 - journaled - 1
    inbox.settle([e.id for e in delivered[:30]], [])
    ingress.answered(30, 30 * 100_000)
    assert len(wire.acked) > journaled and len(inbox) > journaled - 30
