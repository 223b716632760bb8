"""Egress: the daemon's publishes, in order, within our own window, across reconnects.

`publish` calls back exactly once: for QoS1, when the broker's PUBACK arrives (or with the reason
it refused); for QoS0, which has no PUBACK, once paho has written it to the socket.
Egress keeps its own queue and in-flight window: paho is given only what fits the window (a window
inside paho would send a later message before queued ones after a reconnect). On each CONNACK
(`take_back`), what was in flight is taken back from paho to be sent again first, in order, marked
as a possible duplicate; then the queue. Outputs published as urgent (high-priority events'
answers) have a queue of their own, sent first: they never wait behind a backlog of other answers
(order holds within each queue).

Turns. The queue of the other outputs is one line per function (the `edgefn-function` user property
its answers carry; the rest share one line), and the lines take turns (`Turns`): a flooded function's
backlog of answers, tens of thousands behind a broker that takes 20 at a time, never holds up another
function's answer (a neighbour's answer waited 17-42 s behind one). Order holds within each line.

A broker acknowledges in order, so a PUBACK for a later message means the earlier ones' were lost
(mosquitto 2.0.16-2.0.20 drop PUBACKs once a client has `max_queued_messages` packets unwritten):
egress then asks the session to reconnect, which makes both sides resend.

Locks, nested in this order only: paho's own -> `_handing` -> `_lock`.
- paho calls `acknowledged` holding its own mutexes (`_out_message_mutex` among them), which
  `client.publish` needs: paho's thread must never wait for `_handing` while another thread holds
  it. So one thread at a time pumps (the `_pumping` flag); a caller that finds another pumping
  leaves the work to it (`_pump_again`). The only other taker of `_handing` is `take_back`, on
  paho's thread in its CONNACK callback, where paho holds only `_in_callback_mutex`, which
  `publish` never waits for.
- `_handing` is held while one message goes from the queue into paho, so that a CONNACK's
  `take_back` finds it recorded in flight (or still queued), never between the two.
- `_lock` (a Condition) guards the queue, the window, what awaits a PUBACK and the pumping flags;
  it is never held while calling paho or an `on_acked` callback. A `publish` blocked on a full
  queue waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edgefn.mqtt.limits import BrokerLimits
from edgefn.observe.logs import Every
from edgefn.protocol.outputs import FUNCTION, POSSIBLE_DUPLICATE

log = logging.getLogger("edgefn.mqtt")

# QoS1 publishes of ours awaiting a PUBACK, at most (and no more than the broker's own Receive
# Maximum, 20 on a stock mosquitto): few enough that their PUBACKs never crowd the broker's queue
# for us, and far from paho's message ids wrapping at 65,535.
PUBLISH_WINDOW = 256
MAX_UNSENT = 60_000  # publish() blocks past this many queued outputs while connected (memory)
OnAcked = Callable[["str | None"], None]  # None when delivered, else why the broker refused it
OnPuback = Callable[[str, "str | None"], None]  # (topic, None or why the broker refused it): each PUBACK

_NOT_YET = object()


class UserProperties:
    """The MQTT 5 user properties of one PUBLISH, packed once. paho asks only for `pack()`; its own
    Properties class packs in Python at about 25 µs a message, a fifth of the daemon's time per event."""

    __slots__ = ("pairs", "_packed")

    def __init__(self, pairs: Sequence[tuple[str, str]] = ()):
        self.pairs = list(pairs)
        self._packed: bytes | None = None

    def add(self, pair: tuple[str, str]) -> None:
        if pair not in self.pairs:
            self.pairs.append(pair)
            self._packed = None

    def pack(self) -> bytes:
        if self._packed is None:
            body = b"".join(b"\x26" + _utf8(key) + _utf8(value) for key, value in self.pairs)
            self._packed = _variable_byte_integer(len(body)) + body
        return self._packed


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _variable_byte_integer(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


@dataclass(slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    on_acked: OnAcked
    props: UserProperties
    qos: int = 1
    retain: bool = False
    sent_qos: int = 1  # the QoS it went out at: no more than the broker allows
    seq: int = 0  # order handed to paho on this connection
    sent_at: float = 0.0


class Turns:
    """Queued outputs, one line per flow, the lines taking turns; what a CONNACK took back goes first."""

    def __init__(self) -> None:
        self._again: deque[_Outgoing] = deque()  # taken back from paho: first, in order
        self._lines: dict[str, deque[_Outgoing]] = {}  # by flow, in turn order (a served line goes last)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, out: _Outgoing, flow: str) -> None:
        line = self._lines.get(flow)
        if line is None:
            line = self._lines[flow] = deque()
        line.append(out)
        self._count += 1

    def again(self, outs: list[_Outgoing]) -> None:
        self._again.extendleft(reversed(outs))
        self._count += len(outs)

    def popleft(self) -> _Outgoing:
        self._count -= 1
        if self._again:
            return self._again.popleft()
        flow, line = next(iter(self._lines.items()))
        out = line.popleft()
        del self._lines[flow]  # its turn taken: to the end, or gone while empty
        if line:
            self._lines[flow] = line
        return out


def _flow(user_properties: Sequence[tuple[str, str]]) -> str:
    """Whose output this is: its function's `edgefn-function` property ("" for none)."""
    return next((value for key, value in user_properties if key == FUNCTION), "")


class Egress:
    """The publish queue and in-flight window of one paho client. `reconnect(why)` is the session's:
    called when a PUBACK was lost; `on_puback(topic, refused)`, the broker's answer to each QoS1
    message (what it refuses is counted there), on paho's thread."""

    def __init__(self, client: mqtt.Client, reconnect: Callable[[str], None], on_puback: OnPuback | None = None):
        self._client, self._reconnect = client, reconnect
        self._on_puback = on_puback
        self._lock = threading.Condition()  # the queue, the window and what awaits a PUBACK
        self._unsent = Turns()  # not handed to paho yet, in publish() order per function, taking turns
        self._urgent: deque[_Outgoing] = deque()  # the same, published as urgent: sent first
        self._in_flight: dict[int, _Outgoing] = {}  # by mid, in the order handed to paho
        self._early: dict[int, str | None] = {}  # PUBACKs that raced ahead of their mid being recorded
        self._window = 0  # how many may await a PUBACK; 0 while disconnected
        self._limits = BrokerLimits()  # what the broker allows, as its last CONNACK said
        self._seq = 0
        self._pumping = self._pump_again = False  # one thread hands messages to paho at a time: order
        self._handing = threading.Lock()  # held while one message goes from the queue into paho
        self._unpublishable = Every(60.0)

    @property
    def awaiting_ack(self) -> int:
        """Outputs published and not yet acknowledged (queued or in flight)."""
        with self._lock:
            return len(self._unsent) + len(self._urgent) + len(self._in_flight)

    @property
    def window_open(self) -> bool:
        """Connected, as far as egress knows: from a CONNACK to the next disconnect."""
        with self._lock:
            return bool(self._window)

    def oldest_sent_at(self) -> float | None:
        """When the oldest message awaiting its PUBACK was handed to paho; None when none awaits one
        or the window is closed."""
        with self._lock:
            if not (self._window and self._in_flight):
                return None
            return next(iter(self._in_flight.values())).sent_at

    # -- the session's turns -------------------------------------------------------------------------
    def take_back(self, limits: BrokerLimits) -> None:
        """On a CONNACK, on paho's thread before paho resends its unacknowledged messages: take them
        back, to go again first and in order with the queue, within the `limits` the broker allows
        (its Receive Maximum the window, its Maximum QoS, retain, packet size)."""
        with self._handing:  # a message being handed to paho is recorded first
            self._client.drop_out_messages()
            with self._lock:
                again = list(self._in_flight.values())
                self._in_flight.clear()
                self._early.clear()
                for out in again:  # the broker may have passed them on already
                    out.props.add(POSSIBLE_DUPLICATE)
                self._unsent.again(again)
                self._limits = limits
                self._window = min(PUBLISH_WINDOW, limits.receive_maximum)

    def hold(self) -> None:
        """On a disconnect: hold everything until the next CONNACK."""
        with self._lock:
            self._window = 0

    # -- publishing ----------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, on_acked: OnAcked,
                user_properties: Sequence[tuple[str, str]] = (), qos: int = 1, retain: bool = False,
                urgent: bool = False) -> None:
        """Publish at QoS1 (or 0); `on_acked(None)` once the broker has it (QoS0: once written),
        `on_acked(reason)` if it refused it (or paho would not take it). Outputs go out in the order
        of the calls (per function: the functions' lines take turns), across reconnects; `urgent` ones
        ahead of the others.

        While connected, blocks as long as MAX_UNSENT outputs wait to be sent."""
        out = _Outgoing(topic, payload, on_acked, UserProperties(user_properties), qos, retain)
        with self._lock:
            while self._window and len(self._unsent) + len(self._urgent) >= MAX_UNSENT:
                self._lock.wait(1.0)
            if urgent:
                self._urgent.append(out)
            else:
                self._unsent.append(out, _flow(user_properties))
        self.pump()

    def pump(self) -> None:
        """Hand queued messages to paho while the window has room. Whoever calls this while another
        thread pumps leaves it to that thread (paho's own thread must never wait here: it holds
        paho's lock, which the pumping thread needs)."""
        with self._lock:
            if self._pumping:
                self._pump_again = True
                return
            self._pumping = True
        while True:
            with self._handing:
                with self._lock:
                    if not ((self._urgent or self._unsent) and len(self._in_flight) < self._window):
                        if not self._pump_again:
                            self._pumping = False
                            return
                        self._pump_again = False
                        continue
                    out = (self._urgent or self._unsent).popleft()
                    self._lock.notify_all()  # room for a blocked publish()
                self._hand_over(out)

    def _hand_over(self, out: _Outgoing) -> None:
        limits = self._limits  # replaced by take_back under `_handing`, which our caller holds
        out.sent_qos = min(out.qos, limits.maximum_qos)
        if (too_large := _too_large(out, limits.maximum_packet_size)) is not None:
            self._not_published(out, too_large)  # sent, it would make the broker drop the connection, again and again
            return
        try:
            while True:
                info = self._client.publish(out.topic, out.payload, qos=out.sent_qos,
                                            retain=out.retain and limits.retain_available,
                                            properties=out.props)  # type: ignore[arg-type]
                # Its only cause here (paho's queue is unbounded): the id came round to a message
                # still awaiting its PUBACK. paho skipped it; the next one is free.
                if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                    break
        except ValueError as exc:  # a topic or payload paho refuses
            self._not_published(out, str(exc))
            return
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: resent after the CONNACK
            self._not_published(out, mqtt.error_string(info.rc))
            return
        with self._lock:
            refused = self._early.pop(info.mid, _NOT_YET)
            if refused is _NOT_YET:
                self._seq += 1
                out.seq, out.sent_at = self._seq, time.monotonic()
                self._in_flight[info.mid] = out
        if refused is not _NOT_YET:
            self._answered(out, refused)  # type: ignore[arg-type]

    def _answered(self, out: _Outgoing, refused: str | None) -> None:
        """The broker's answer to `out` reaches its refusal count (only what went out at QoS1 has one:
        a QoS0 write says nothing) and then its owner."""
        if self._on_puback is not None and out.sent_qos == 1:
            self._on_puback(out.topic, refused)
        out.on_acked(refused)

    def _not_published(self, out: _Outgoing, why: str) -> None:
        if (skipped := self._unpublishable.due()) is not None:
            log.error("a message to %r was not published: %s (%d more since the last line)", out.topic, why, skipped)
        out.on_acked(f"not published: {why}")

    def acknowledged(self, mid: int, refused: str | None) -> None:
        """The broker's PUBACK for `mid` (paho's thread, holding paho's lock): None, or why it refused.
        For a QoS0 message, paho calls this once it has written it."""
        with self._lock:
            out = self._in_flight.pop(mid, None)
            if out is None:
                self._early[mid] = refused
                return
            # The broker acknowledges in order: an earlier message still waiting lost its PUBACK.
            # (A QoS0 message is only written, in order: its callback says nothing of the others'.)
            lost = out.sent_qos == 1 and bool(self._in_flight) and next(iter(self._in_flight.values())).seq < out.seq
        self._answered(out, refused)
        if lost:
            self._reconnect("the broker's acknowledgement of an earlier message was lost")
        self.pump()


def _too_large(out: _Outgoing, maximum: int | None) -> str | None:
    """Why the broker would not take `out`'s PUBLISH (None: it would)."""
    if maximum is None:
        return None
    topic = len(out.topic.encode())
    remaining = 2 + topic + (2 if out.sent_qos else 0) + len(out.props.pack()) + len(out.payload)
    size = 1 + len(_variable_byte_integer(remaining)) + remaining
    if size <= maximum:
        return None
    return f"{size} bytes, more than the broker's Maximum Packet Size of {maximum}"
