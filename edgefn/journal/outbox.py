"""The journal's other half: answers on their way to the broker, and settling answered events.

An event stays in the inbox until every function it triggered has answered (`Pending`). Each
answer's messages are published at once (`publish`); an `Output` is done when the broker's PUBACK
comes. Every 50 ms the daemon calls `settle()`: one transaction removes the answered events from
the inbox and puts those of their outputs still awaiting a PUBACK into the outbox table, and
removes outbox rows acknowledged since. So the outbox is written only while the broker is slow or
away, and after a crash an answer that was made is published again instead of made again.

Locks: `_lock` guards only this object's lists and counters and is never held while publishing or
writing the store, so a PUBACK (on paho's thread) never waits for a worker or for the disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgefn.events import Event, Message
from edgefn.journal.inbox import Inbox
from edgefn.observe.metrics import Metrics
from edgefn.protocol.outputs import EVENT, POSSIBLE_DUPLICATE

log = logging.getLogger("edgefn.journal")

OnAcked = Callable[[str | None], None]  # None when delivered, else why the broker refused it
Publish = Callable[..., None]  # Connection.publish(topic, payload, on_acked, properties, qos, retain, urgent=)


@dataclass(eq=False)
class Output:
    """A message on its way to the broker; in the outbox (`row`) if its event settles first."""

    event_id: str
    message: Message
    acked: bool = False
    row: int | None = None


_ANSWERING = threading.Lock()  # Pending.answered: brief, and one lock for all keeps a Pending small


@dataclass(eq=False, slots=True)
class Pending:
    """An event until every function it went to has answered. It holds no payload: an event that
    waits for room in its functions' lanes waits on disk only, and this (about 100 bytes) in memory."""

    event_id: str
    replayed: bool  # run again after a restart: its outputs may have reached subscribers before
    size: int  # payload bytes (the inbox's bound counts them)
    functions: int  # functions still working on it
    outputs: list[Output] | None = None  # once a function answered

    @classmethod
    def of(cls, event: Event, functions: int, size: int | None = None) -> Pending:
        return cls(event.id, event.replayed, len(event.payload) if size is None else size, functions)

    def answered(self, outputs: list[Output]) -> bool:
        """One function has answered with these outputs; True when it was the last one."""
        with _ANSWERING:
            self.outputs = list(outputs) if self.outputs is None else self.outputs + outputs
            self.functions -= 1
            return self.functions == 0


class Outbox:
    """Publishes answers, tracks their PUBACKs, and settles answered events into the store."""

    def __init__(self, store: Inbox, publish: Publish, metrics: Metrics,
                 on_settled: Callable[[int, int], None], rows: int = 0):
        self._store, self._publish, self._metrics, self._on_settled = store, publish, metrics, on_settled
        # What the next settle writes: events answered, outbox rows delivered.
        self._answered: list[Pending] = []
        self._delivered: list[int] = []
        self._awaiting_ack = 0  # outputs published and not yet acknowledged (nor refused)
        self.rows = rows  # outputs in the outbox table
        self.progress_at = time.monotonic()  # the last PUBACK or settle: what tells a stall from a quiet spell
        self._lock = threading.Lock()

    @property
    def awaiting_ack(self) -> int:
        return self._awaiting_ack

    def replay(self, unsent: list[tuple[int, str, Message]]) -> None:
        """Publish again what the outbox held at start (before any new answer)."""
        for row, event_id, message in unsent:
            self.send(Output(event_id, message, row=row), replayed=True)

    def answer(self, pending: Pending, messages: list[Message], properties: Sequence[tuple[str, str]],
               urgent: bool = False) -> None:
        """One function's answer to a pending event: publish its messages (`urgent`: a high-priority
        event's, ahead of the others waiting to be sent); the event settles once every function it
        went to has answered."""
        outputs = [Output(pending.event_id, m) for m in messages]
        for out in outputs:
            self.send(out, pending.replayed, properties, urgent)
        if pending.answered(outputs):
            self.done(pending)

    def done(self, pending: Pending) -> None:
        """Every function has answered `pending` (or none was triggered): it leaves the inbox at the next settle."""
        with self._lock:
            self._answered.append(pending)

    def unsettled(self) -> int:
        """Answered events not settled yet."""
        with self._lock:
            return len(self._answered)

    def send(self, out: Output, replayed: bool, properties: Sequence[tuple[str, str]] = (), urgent: bool = False) -> None:
        message = out.message
        props = [(EVENT, out.event_id), *properties]
        if replayed:
            props.append(POSSIBLE_DUPLICATE)
        props.extend(message.properties)  # the function's own follow edgefn's
        with self._lock:
            self._awaiting_ack += 1
        try:
            self._publish(message.topic, message.payload, lambda r: self._acked(out, r), props, message.qos,
                          message.retain, urgent=urgent)
        except Exception:  # kept: it waits in the outbox and is published again after a restart
            log.exception("event %s: could not publish to %r", out.event_id, out.message.topic)
            self._acked(out, "not published")

    def _acked(self, out: Output, refused: str | None) -> None:
        with self._lock:
            self._awaiting_ack -= 1
            self.progress_at = time.monotonic()
            if refused is None:
                out.acked = True
                if out.row is not None:
                    self._delivered.append(out.row)
        if refused is None:
            self._metrics.messages_published.inc()
        else:
            # The broker said no (not authorized, quota, too large): the output stays in the
            # outbox, to be published again after a restart, rather than counted as delivered.
            # Not a line each: the broker's refusals are counted and said once a minute by filter
            # (edgefn.observe.refusals), what paho would not send by egress.
            self._metrics.messages_refused.inc()
            log.debug("event %s: the message on %r was not delivered: %s", out.event_id, out.message.topic, refused)

    def settle(self) -> None:
        """One transaction: answered events leave the inbox, their unacknowledged outputs enter the
        outbox, and outbox rows acknowledged since the last settle leave it."""
        with self._lock:
            answered, self._answered = self._answered, []
            delivered, self._delivered = self._delivered, []
            undelivered = [out for p in answered for out in p.outputs or () if not out.acked]
        if not answered and not delivered:
            return
        try:
            rows = self._store.settle([p.event_id for p in answered],
                                      [(out.event_id, out.message) for out in undelivered], delivered)
        except Exception:
            with self._lock:  # try again next time
                self._answered[:0] = answered
                self._delivered[:0] = delivered
            raise
        with self._lock:
            for out, row in zip(undelivered, rows, strict=True):
                out.row = row
                if out.acked:  # acknowledged while the transaction ran
                    self._delivered.append(row)
            self.rows += len(rows) - len(delivered)
            self.progress_at = time.monotonic()
        self._on_settled(len(answered), sum(p.size for p in answered))
