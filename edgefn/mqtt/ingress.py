"""Ingress: events from the broker into the inbox. Commit first, then acknowledge, then hand over.

Runs on paho's network thread. Events that arrive together are committed in one transaction:
a group is flushed as soon as the socket has no more bytes waiting (or at 256 events or 4 MiB), so a
lone event is committed at once and a burst costs one commit per group instead of one per event.
A group that ends while the socket still looked readable (a ping response, say) is flushed by
`flush()`, which the daemon calls every few milliseconds.

Backpressure: when the inbox holds `max_events` unanswered events or `max_bytes` of their
payloads (on disk), or the journal takes none (a full disk, its byte budget on disk reached: not
`Inbox.taking`), new ones are held in memory unacknowledged, and journaled and acknowledged as
answers make room (`answered`) or the journal takes events again (`flush`). Past `max_held_bytes` of held payloads, ingress asks the
connection to stop reading (`pause`): the broker keeps the rest, and memory stays bounded in bytes.
A payload over `max_payload_bytes` is journaled as its head only (and answered with an error): it
never costs more than that in memory or on disk.

Events are handed over (`deliver`) outside the ingress's lock, in the order they were committed:
delivery may wait (a release being swapped in), and paho's thread must never wait behind it.

Priorities. Each priority class comes on a broker session of its own (connection.py); its events
are journaled with their class. Held events wait per class, and room in the inbox goes to the most
urgent first; high-priority events may also use a headroom of a quarter past the inbox's bound
(`HEADROOM`). Past `max_held_bytes`, reading stops on the normal and low sessions first; the high
session stops only past `max_held_bytes` and its headroom. Reading resumes on all at half the bound.

QoS 0 events are journaled like the others but never acknowledged: MQTT has nothing to acknowledge
for them (a PUBACK for one is a protocol error, and the broker drops the connection), and the
broker never redelivers them. So held QoS 0 events are kept across a disconnect and journaled on
close; past `max_events` of them held, new ones are dropped (the sender chose at most once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from edgefn.errors import StorageError
from edgefn.events import PRIORITIES, Event, Priority
from edgefn.journal.inbox import Inbox
from edgefn.observe.logs import Every

GROUP = 256
GROUP_BYTES = 4 * 1024 * 1024  # a group's payloads: a commit copies them into the WAL, then the file (twice on disk)
log = logging.getLogger("edgefn.ingress")

# topic, payload, mid, qos, received_ms, redelivered, dropped, the priority class of its session, its hop count
_Received = tuple[str, bytes, int, int, float, bool, int, Priority, int]


HELD_OVERHEAD = 256  # what a held event costs in memory besides its payload (its tuple, topic, ...)
HEAD_BYTES = 1024  # what is kept of a payload over max_payload_bytes: enough for the sensor's own id
HEADROOM = 1.25  # of the inbox's bound and of max_held_bytes, for high-priority events


class Ingress:
    def __init__(self, inbox: Inbox, max_events: int, deliver: Callable[[list[Event]], None],
                 ack: Callable[..., None], more_waiting: Callable[[], bool], outstanding: int = 0,
                 max_bytes: int = 1 << 62, outstanding_bytes: int = 0, *, max_payload_bytes: int = 1 << 62,
                 max_held_bytes: int = 1 << 62, pause: Callable[[bool], None] = lambda paused: None,
                 pause_high: Callable[[bool], None] = lambda paused: None,
                 ack_many: Callable[[list[int], Priority], None] | None = None):
        """`ack(mid, qos, priority)` acknowledges on the session of that priority class (`ack_many(mids,
        priority)`, where given, a group's QoS 1 events of a class at once); `pause` and `pause_high` stop
        or resume reading on the normal and low sessions / on the high one."""
        self._inbox, self._max, self._max_bytes, self._deliver = inbox, max_events, max_bytes, deliver
        self._ack, self._ack_many = ack, ack_many
        self._more_waiting, self._pause, self._pause_high = more_waiting, pause, pause_high
        self._max_payload, self._max_held_bytes = max_payload_bytes, max_held_bytes
        self.outstanding = outstanding  # journaled and not yet answered
        self.outstanding_bytes = outstanding_bytes  # their payload bytes
        self._pending_bytes = 0
        self.accepting = True
        self._pending: list[_Received] = []  # received, not yet committed
        # Past the bound, per priority class (most urgent first): not journaled, not acknowledged.
        self._held: dict[Priority, deque[_Received]] = {p: deque() for p in PRIORITIES}
        self._held_qos0 = 0  # of those, QoS 0 ones: the broker keeps no copy of them
        self._held_bytes = 0
        self.paused = False  # reading from the normal and low sessions stopped: held payloads past max_held_bytes
        self.paused_high = False  # and from the high one: past max_held_bytes and its headroom
        self._ready: deque[list[Event]] = deque()  # committed groups, to be delivered in this order
        self._delivering = False  # one thread delivers at a time (order), outside the lock
        self.dropped_qos0 = 0  # QoS 0 events dropped past the bound
        self._lock = threading.Lock()
        self._journal_failed, self._qos0_dropped = Every(10.0), Every(10.0)

    @property
    def held(self) -> int:
        return sum(map(len, self._held.values()))

    def _next_held(self) -> deque[_Received] | None:
        """The most urgent class that holds events."""
        return next((held for held in self._held.values() if held), None)

    def on_message(self, topic: str, payload: bytes, mid: int, qos: int, dup: bool,
                   priority: Priority = "normal", hop: int = 0) -> None:
        dropped = 0
        if len(payload) > self._max_payload:  # refused by size: only its head is kept, for the error answer
            payload, dropped = payload[:HEAD_BYTES], len(payload)
        with self._lock:
            if not self.accepting:
                return  # not acknowledged: the broker keeps it for the next start (QoS 0: lost)
            # dup: the broker sent it before (to a daemon that may have answered it, then crashed)
            item = (topic, payload, mid, qos, time.time() * 1000.0, dup, dropped, priority, hop)
            if self._held[priority] or self._full(len(payload), priority == "high"):
                self._hold(item)
            else:
                self._take(item)
                if len(self._pending) >= GROUP or self._pending_bytes >= GROUP_BYTES or not self._more_waiting():
                    self._flush()
        self._deliver_ready()

    def _full(self, size: int, urgent: bool = False) -> bool:
        """No room for one more event of `size` bytes (an empty inbox always has room); `urgent`:
        counting the headroom of high-priority events."""
        if not self._inbox.taking:  # a full disk or the journal's budget: held, bounded like any other
            return True
        events = self.outstanding + len(self._pending)
        if events == 0:
            return False
        scale = HEADROOM if urgent else 1.0
        return events >= self._max * scale or self.outstanding_bytes + self._pending_bytes + size > self._max_bytes * scale

    def _hold(self, item: _Received) -> None:
        if item[3] == 0:
            if self._held_qos0 >= self._max:  # the broker would not keep them either
                self.dropped_qos0 += 1
                if (skipped := self._qos0_dropped.due()) is not None:
                    log.warning("inbox full: QoS 0 event on %r dropped (%d more since the last line; %d in all)",
                                item[0], skipped, self.dropped_qos0)
                return
            self._held_qos0 += 1
        self._held[item[7]].append(item)
        self._held_bytes += len(item[1]) + HELD_OVERHEAD
        if self._held_bytes > self._max_held_bytes and not self.paused:
            self._set_paused(True)
        if self._held_bytes > self._max_held_bytes * HEADROOM and not self.paused_high:
            self._set_paused_high(True)

    def _take_held(self, held: deque[_Received]) -> None:
        item = held.popleft()
        self._held_qos0 -= item[3] == 0
        self._held_bytes -= len(item[1]) + HELD_OVERHEAD
        self._take(item)

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._pause(paused)

    def _set_paused_high(self, paused: bool) -> None:
        self.paused_high = paused
        self._pause_high(paused)

    def _resume_if_room(self) -> None:
        """Read again once the held payloads are down to half their bound (not at once: no flapping)."""
        if self._held_bytes <= self._max_held_bytes // 2:
            if self.paused_high:
                self._set_paused_high(False)
            if self.paused:
                self._set_paused(False)

    def _take(self, item: _Received) -> None:
        self._pending.append(item)
        self._pending_bytes += len(item[1])

    def flush(self) -> None:
        with self._lock:
            self._take_room()  # the journal may take events again with none answered (space returned)
            self._flush()
        self._deliver_ready()

    def _deliver_ready(self) -> None:
        """Deliver the committed groups, in order, outside the lock; one thread at a time does it."""
        with self._lock:
            if self._delivering or not self._ready:
                return
            self._delivering = True
        while True:
            with self._lock:
                if not self._ready:
                    self._delivering = False
                    return
                events = self._ready.popleft()
            try:
                self._deliver(events)
            except Exception:  # a bug of ours: the events stay journaled and run again after a restart
                log.exception("delivering %d events failed", len(events))

    def _flush(self) -> bool:
        """Commit the pending group and acknowledge it; False when the journal refused it (kept pending)."""
        if not self._pending:
            return True
        group, self._pending = self._pending, []
        try:
            events = self._inbox.append_many([(topic, payload, received, dropped, priority, hop)
                                              for topic, payload, _, _, received, _, dropped, priority, hop in group])
        except StorageError:  # a full disk: the journal said so once; nothing acknowledged, tried again later
            self._pending[:0] = group
            return False
        except Exception as exc:  # an I/O error of another kind: nothing acknowledged, try again on the next flush
            self._pending[:0] = group
            if (skipped := self._journal_failed.due()) is not None:  # flush runs every few ms
                log.error("cannot journal %d events; they stay unacknowledged: %s (%d failures since the last line)",
                          len(group), exc, skipped)
            return False
        self.outstanding += len(events)
        self.outstanding_bytes += self._pending_bytes
        self._pending_bytes = 0
        self._acknowledge(group)  # only now, with the group durable
        self._ready.append([replace(e, replayed=True) if item[5] else e for e, item in zip(events, group, strict=True)])
        return True

    def _acknowledge(self, group: list[_Received]) -> None:
        """Each event of a committed group on its session (mids are per session); QoS 0 has no acknowledgement."""
        if self._ack_many is None:
            for _, _, mid, qos, _, _, _, priority, _ in group:
                if qos:
                    self._ack(mid, qos, priority)
            return
        by_class: dict[Priority, list[int]] = {}
        for _, _, mid, qos, _, _, _, priority, _ in group:
            if qos == 1:
                by_class.setdefault(priority, []).append(mid)
            elif qos:
                self._ack(mid, qos, priority)
        for priority, mids in by_class.items():
            self._ack_many(mids, priority)

    def answered(self, n: int, nbytes: int = 0) -> None:
        """n events (nbytes of payload) left the inbox: take held ones in their place."""
        with self._lock:
            self.outstanding -= n
            self.outstanding_bytes -= nbytes
            self._take_room()
            self._flush()
        self._deliver_ready()

    def _take_room(self) -> None:
        """Held events, most urgent first, into the room there is now, committed a group at a time:
        a group the journal refuses (its budget) stays one group, and the rest stay held."""
        while (held := self._next_held()) is not None and not self._full(len(held[0][1]), held[0][7] == "high"):
            self._take_held(held)
            if self._pending_bytes >= GROUP_BYTES and not self._flush():
                break
        self._resume_if_room()

    def disconnected(self, priority: Priority = "normal") -> None:
        """The session of `priority` went down; the broker redelivers what it never had acknowledged:
        forget the held copies (not QoS 0 ones, which it does not keep). The other sessions' stay."""
        with self._lock:
            self._held[priority] = deque(item for item in self._held[priority] if item[3] == 0)
            self._held_bytes = sum(len(item[1]) + HELD_OVERHEAD for held in self._held.values() for item in held)
            self._resume_if_room()
            kept = [item for item in self._pending if item[3] == 0 or item[7] != priority]
            self._pending = kept  # not journaled, not acknowledged: redelivered too
            self._pending_bytes = sum(len(item[1]) for item in kept)

    def close(self) -> None:
        """Stop taking events; what is pending is committed and acknowledged, what is held is not
        (except QoS 0 events, journaled past the bound: nobody else has them)."""
        with self._lock:
            self.accepting = False
            for held in self._held.values():
                for item in held:
                    if item[3] == 0:
                        self._take(item)
                held.clear()
            self._flush()
            self._held_qos0 = self._held_bytes = 0
        self._deliver_ready()
