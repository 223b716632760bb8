"""The daemon's one connection to the broker (paho-mqtt 2).

MQTT 5. Ingress is acknowledged by hand (`manual_ack=True`): the daemon calls `ack(mid)` only
once the event is durable, so a crash before that means the broker redelivers it. The session
is persistent (clean start off, a session expiry) so that the broker keeps the subscription and
what it queued while the daemon was away. The CONNECT asks for a large Receive Maximum: the
broker may then send that many QoS1 messages before our acknowledgements, instead of the 20 it
allows an MQTT 3.1.1 client; mosquitto counts those as in flight, not against its
`max_queued_messages` (1000), past which it drops. That, not raw speed, is what keeps a burst
from being lost at the broker while the inbox catches up.

Egress is QoS1; `publish` calls back exactly once, when the broker's PUBACK arrives (or with the
reason it refused). The connection keeps its own queue and in-flight window (paho is given only
what fits the window: a window inside paho would send a later message before queued ones after a
reconnect). On each CONNACK, what was in flight is taken back from paho and sent again first, in
order, marked as a possible duplicate; then the queue. Nothing waits for the SUBACK: mosquitto
writes it behind everything it resends to us, and 2.0.16-2.0.20 drop it outright (with any other
packet) once a client has `max_queued_messages` packets unwritten. A SUBACK that does not come
within `suback_timeout` is asked for again.

Lost PUBACKs (the same mosquitto versions drop them too) are recovered by reconnecting, which
makes both sides resend: a broker acknowledges in order, so a PUBACK for a later message means
the earlier ones' were lost; and nothing heard from the broker for `ack_timeout` while publishes
wait means acknowledgements stopped.

QoS 0 events are passed on with qos=0 and never acknowledged (a PUBACK for one is a protocol
error: the broker drops the connection).
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.config import Settings
from edgefn.errors import BrokerError
from edgefn.files import write_atomic
from edgefn.mqtt.client import PausableClient
from edgefn.observe.logs import Every
from edgefn.protocol.outputs import POSSIBLE_DUPLICATE

log = logging.getLogger("edgefn.mqtt")

RECEIVE_MAXIMUM = 65535  # QoS1 messages the broker may send ahead of our acknowledgements (the MQTT 5 maximum)
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our session and its queue this long while we are away
# QoS1 publishes of ours awaiting a PUBACK, at most (and no more than the broker's own Receive
# Maximum, 20 on a stock mosquitto): few enough that their PUBACKs never crowd the broker's queue
# for us, and far from paho's message ids wrapping at 65,535.
PUBLISH_WINDOW = 256
MAX_UNSENT = 60_000  # publish() blocks past this many queued outputs while connected (memory)
ACK_TIMEOUT_S = 30.0  # publishes waiting and nothing heard from the broker this long: reconnect
KEEPALIVE_S = 30
SUBACK_TIMEOUT_S = 30.0  # no SUBACK this long: subscribe again
OnAcked = Callable[["str | None"], None]  # None when delivered, else why the broker refused it
OnMessage = Callable[[str, bytes, int, int, bool], None]  # topic, payload, mid, qos, dup


def _no_delay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    # The PUBACK of an event goes out just before its result: without TCP_NODELAY, Nagle holds
    # the result until the broker's delayed ACK of the PUBACK, about 40 ms later.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        pass


_NOT_YET = object()


@dataclass(slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    on_acked: OnAcked
    props: UserProperties
    seq: int = 0  # order handed to paho on this connection
    sent_at: float = 0.0


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


class Connection:
    def __init__(self, settings: Settings, on_message: OnMessage, filters: Sequence[str],
                 on_disconnect: Callable[[], None] | None = None, subscriptions_file: Path | None = None, *,
                 receive_maximum: int = RECEIVE_MAXIMUM, ack_timeout: float = ACK_TIMEOUT_S,
                 suback_timeout: float = SUBACK_TIMEOUT_S, keepalive: int = KEEPALIVE_S):
        self._settings, self._on_message, self._filters = settings, on_message, list(filters)
        self._receive_maximum, self._ack_timeout, self._suback_timeout = receive_maximum, ack_timeout, suback_timeout
        self._keepalive = keepalive
        # The broker keeps the session's subscriptions across restarts: what was subscribed before (by
        # an earlier release, with other triggers) is recorded here and dropped on connect.
        self._subscriptions_file = subscriptions_file
        self._subscribed = set(self._recorded())  # as the broker's session last had them, as far as we know
        self._on_disconnect = on_disconnect
        client = PausableClient(CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                                protocol=mqtt.MQTTv5, manual_ack=True)
        # Unbounded: the window is ours (see the module docstring); paho only ever holds what fits it.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if settings.tls:
            try:
                client.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None,
                               certfile=str(settings.cert_file) if settings.cert_file else None,
                               keyfile=str(settings.key_file) if settings.key_file else None,
                               cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise BrokerError(f"TLS settings: {exc}") from None
        client.on_connect = self._connected
        client.on_connect_fail = self._connect_failed
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        client.on_publish = self._published
        client.on_subscribe = self._suback
        client.on_socket_open = _no_delay
        self._client = client
        self._lock = threading.Condition()  # the queue, the window and what awaits a PUBACK
        self._unsent: deque[_Outgoing] = deque()  # not handed to paho yet, in publish() order
        self._in_flight: dict[int, _Outgoing] = {}  # by mid, in the order handed to paho
        self._early: dict[int, str | None] = {}  # PUBACKs that raced ahead of their mid being recorded
        self._window = 0  # how many may await a PUBACK; 0 while disconnected
        self._seq = 0
        self._pumping = self._pump_again = False  # one thread hands messages to paho at a time: order
        self._handing = threading.Lock()  # held while one message goes from the queue into paho
        self._heard = time.monotonic()  # the last PUBLISH, PUBACK or SUBACK from the broker
        self._reconnecting = False  # a reconnect was asked for on this connection
        self._subscribing: dict[int, tuple[list[str], float]] = {}  # SUBSCRIBE mid -> filters, sent at
        self._stopped = threading.Event()
        self._watch: threading.Thread | None = None
        self._lost_acks, self._late_subacks, self._refused_subs = Every(10.0), Every(10.0), Every(10.0)
        self._filters_lock = threading.Lock()  # the filters, and subscribing to them on connect
        self.connected = threading.Event()
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        s = self._settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = self._receive_maximum
        self._client.connect_async(s.broker_host, s.broker_port, keepalive=self._keepalive, clean_start=False, properties=props)
        self._client.loop_start()
        self._watch = threading.Thread(target=self._watchdog, name="edgefn-mqtt-watch", daemon=True)
        self._watch.start()

    def stop(self) -> None:
        self._stopped.set()
        self._client.disconnect()
        self._client.loop_stop()
        if self._watch is not None:
            self._watch.join(timeout=5)

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading from the broker: ingress holds as much as it may in memory."""
        if paused != self._client.paused:
            self._client.paused = paused
            log.debug("%s reading from the broker", "paused" if paused else "resumed")
            if not paused:
                with self._lock:
                    self._heard = time.monotonic()  # the pause was ours, not the broker's silence

    def wait_connected(self, timeout: float) -> None:
        if not self.connected.wait(timeout):
            raise BrokerError(f"no connection to {self._settings.broker} within {timeout:g} s"
                              + (f": {self.last_error}" if self.last_error else ""))

    @property
    def awaiting_ack(self) -> int:
        """Outputs published and not yet acknowledged (queued or in flight)."""
        with self._lock:
            return len(self._unsent) + len(self._in_flight)

    @property
    def awaiting_suback(self) -> int:
        with self._lock:
            return len(self._subscribing)

    # -- connection --------------------------------------------------------------------------------
    def _connected(self, client: mqtt.Client, _u: object, _flags: object, reason: mqtt.ReasonCode,
                   props: Properties) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.error("%s (retrying with backoff)", self.last_error)
            return
        self.last_error = None
        # Called before paho resends its unacknowledged messages: take them back, to go again
        # first and in order with our queue, within the window the broker allows.
        with self._handing:  # a message being handed to paho is recorded first
            client.drop_out_messages()
            with self._lock:
                again = list(self._in_flight.values())
                self._in_flight.clear()
                self._early.clear()
                for out in again:  # the broker may have passed them on already
                    out.props.add(POSSIBLE_DUPLICATE)
                self._unsent.extendleft(reversed(again))
                self._window = min(PUBLISH_WINDOW, getattr(props, "ReceiveMaximum", 65535))
                self._heard = time.monotonic()
                self._reconnecting = False
                self._subscribing.clear()
        with self._filters_lock:  # set_filters sees the filters subscribed here, or changes them before
            if self._filters:
                self._subscribe(self._filters)
            stale = sorted(self._subscribed - set(self._filters))
            if stale:
                client.unsubscribe(stale)
            self._record(self._filters)
            self.connected.set()
        log.info("connected to %s", self._settings.broker)
        self._pump()

    def _connect_failed(self, _client: mqtt.Client, _u: object) -> None:
        # paho calls this from inside its `except OSError:`: the exception says why (refused,
        # unreachable, certificate verify failed, ...).
        reason = sys.exc_info()[1]
        self.last_error = f"cannot connect to {self._settings.broker}" + (f": {reason}" if reason else "")
        log.warning("%s (retrying with backoff)", self.last_error)

    def _disconnected(self, _c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        with self._lock:
            self._window = 0  # hold everything until the next CONNACK
        if self._on_disconnect is not None:
            self._on_disconnect()
        if reason.value != 0 and was_connected:  # after a refusal, keep the refusal's reason
            self.last_error = f"disconnected: {reason}"
            log.warning("%s (reconnecting)", self.last_error)

    def _reconnect(self, why: str) -> None:
        """Drop the connection as a network fault would; paho reconnects and both sides resend."""
        with self._lock:
            if self._reconnecting or not self._window:
                return
            self._reconnecting = True
        if (skipped := self._lost_acks.due()) is not None:
            log.warning("%s: reconnecting to have it resent (%d more since the last line)", why, skipped)
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            try:  # the plain socket's shutdown, under TLS too: paho's own thread sees the end
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def _watchdog(self) -> None:
        tick = max(0.05, min(1.0, self._ack_timeout / 4, self._suback_timeout / 4))
        while not self._stopped.wait(tick):
            now = time.monotonic()
            with self._lock:
                stalled = (self._window and self._in_flight and not self._client.paused
                           and now - self._heard > self._ack_timeout
                           and now - next(iter(self._in_flight.values())).sent_at > self._ack_timeout)
                late = [(mid, filters) for mid, (filters, at) in self._subscribing.items()
                        if now - at > self._suback_timeout]
            if stalled:
                self._reconnect(f"no acknowledgement from the broker for {self._ack_timeout:g} s")
            for mid, filters in late:
                with self._lock:
                    self._subscribing.pop(mid, None)
                if (skipped := self._late_subacks.due()) is not None:
                    log.warning("no SUBACK for %s within %g s: subscribing again (%d more since the last line)",
                                ", ".join(filters), self._suback_timeout, skipped)
                self._subscribe(filters)

    # -- subscriptions -----------------------------------------------------------------------------
    def _subscribe(self, filters: list[str]) -> None:
        rc, mid = self._client.subscribe([(f, 1) for f in filters])
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            with self._lock:
                self._subscribing[mid] = (list(filters), time.monotonic())

    def _suback(self, _c: mqtt.Client, _u: object, mid: int, reasons: list[mqtt.ReasonCode], _p: object) -> None:
        with self._lock:
            self._heard = time.monotonic()
            filters, _ = self._subscribing.pop(mid, ([], 0.0))
        refused = [f"{f}: {r}" for f, r in zip(filters, reasons, strict=False) if r.is_failure]
        if refused and (skipped := self._refused_subs.due()) is not None:
            log.error("the broker refused the subscription to %s (%d more since the last line)", "; ".join(refused), skipped)

    def set_filters(self, filters: Sequence[str]) -> None:
        """Subscribe to `filters` instead of the current ones (a new release's triggers). While
        disconnected, the next connect subscribes to them."""
        with self._filters_lock:
            old, self._filters = set(self._filters), list(filters)
            if not self.connected.is_set():
                return
        added, removed = [f for f in filters if f not in old], sorted(old - set(filters))
        # New ones first: no event for the new functions is missed while the old ones go.
        if added:
            self._subscribe(added)
        if removed:
            self._client.unsubscribe(removed)
        self._record(filters)

    def _recorded(self) -> list[str]:
        if self._subscriptions_file is None:
            return []
        try:
            return [str(f) for f in json.loads(self._subscriptions_file.read_bytes())]
        except (OSError, ValueError, TypeError):
            return []  # none recorded yet (or unreadable: the broker's session may keep a few extra)

    def _record(self, filters: Sequence[str]) -> None:
        if set(filters) == self._subscribed:
            return  # a reconnect to the same subscriptions writes nothing
        self._subscribed = set(filters)
        if self._subscriptions_file is not None:
            try:
                write_atomic(self._subscriptions_file, json.dumps(sorted(filters)).encode())
            except OSError as exc:
                log.warning("%s: cannot record the subscriptions: %s", self._subscriptions_file, exc)

    # -- ingress ---------------------------------------------------------------------------------
    def _message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self._heard = time.monotonic()
        self._on_message(msg.topic, msg.payload, msg.mid, msg.qos, bool(msg.dup))

    def has_more_to_read(self) -> bool:
        """True when bytes of a next packet are already waiting (used to group commits)."""
        sock = self._client.socket()
        if sock is None:
            return False
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes held by the SSL layer
        if pending is not None and pending():
            return True
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def ack(self, mid: int, qos: int = 1) -> None:
        """Acknowledge an event received at `qos`; QoS 0 has nothing to acknowledge."""
        if qos > 0:
            self._client.ack(mid, qos)

    # -- egress ----------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, on_acked: OnAcked,
                user_properties: Sequence[tuple[str, str]] = ()) -> None:
        """Publish at QoS1; `on_acked(None)` once the broker has it, `on_acked(reason)` if it refused
        it (or paho would not take it). Outputs go out in the order of the calls, across reconnects.

        While connected, blocks as long as MAX_UNSENT outputs wait to be sent."""
        out = _Outgoing(topic, payload, on_acked, UserProperties(user_properties))
        with self._lock:
            while self._window and len(self._unsent) >= MAX_UNSENT:
                self._lock.wait(1.0)
            self._unsent.append(out)
        self._pump()

    def _pump(self) -> None:
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
                    if not (self._unsent and len(self._in_flight) < self._window):
                        if not self._pump_again:
                            self._pumping = False
                            return
                        self._pump_again = False
                        continue
                    out = self._unsent.popleft()
                    self._lock.notify_all()  # room for a blocked publish()
                self._hand_over(out)

    def _hand_over(self, out: _Outgoing) -> None:
        try:
            while True:
                info = self._client.publish(out.topic, out.payload, qos=1, properties=out.props)  # type: ignore[arg-type]
                # Its only cause here (paho's queue is unbounded): the id came round to a message
                # still awaiting its PUBACK. paho skipped it; the next one is free.
                if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                    break
        except ValueError as exc:  # a topic or payload paho refuses
            out.on_acked(f"not published: {exc}")
            return
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: resent after the CONNACK
            out.on_acked(f"not published: {mqtt.error_string(info.rc)}")
            return
        with self._lock:
            refused = self._early.pop(info.mid, _NOT_YET)
            if refused is _NOT_YET:
                self._seq += 1
                out.seq, out.sent_at = self._seq, time.monotonic()
                self._in_flight[info.mid] = out
        if refused is not _NOT_YET:
            out.on_acked(refused)  # type: ignore[arg-type]

    def _published(self, _c: mqtt.Client, _u: object, mid: int, reason: mqtt.ReasonCode, _p: object) -> None:
        refused = str(reason) if reason.is_failure else None
        with self._lock:
            self._heard = time.monotonic()
            out = self._in_flight.pop(mid, None)
            if out is None:
                self._early[mid] = refused
                return
            # The broker acknowledges in order: an earlier message still waiting lost its PUBACK.
            lost = bool(self._in_flight) and next(iter(self._in_flight.values())).seq < out.seq
        out.on_acked(refused)
        if lost:
            self._reconnect("the broker's acknowledgement of an earlier message was lost")
        self._pump()
