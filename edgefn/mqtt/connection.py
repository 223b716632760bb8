"""The daemon's one connection to the broker (paho-mqtt 2).

MQTT 5. Ingress is acknowledged by hand (`manual_ack=True`): the daemon calls `ack(mid)` only
once the event is durable, so a crash before that means the broker redelivers it. The session
is persistent (clean start off, a session expiry) so that the broker keeps the subscription and
what it queued while the daemon was away. The CONNECT asks for a large Receive Maximum: the
broker may then send that many QoS1 messages before our acknowledgements, instead of the 20 it
allows an MQTT 3.1.1 client; mosquitto counts those as in flight, not against its
`max_queued_messages` (1000), past which it drops. That, not raw speed, is what keeps a burst
from being lost at the broker while the inbox catches up.

Egress is QoS1; `publish` calls back when the broker's PUBACK arrives, and keeps the order of
its calls across a reconnect: paho resends what it had unacknowledged in the CONNACK handler
(in order, since its in-flight window is unbounded and so never holds one message back while a
later one goes), and what is published from the disconnect until our resubscription's SUBACK
(which paho handles after that resend) is held here and sent after it.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.config import Settings
from edgefn.errors import BrokerError
from edgefn.files import write_atomic

log = logging.getLogger("edgefn.mqtt")

RECEIVE_MAXIMUM = 65535  # QoS1 messages the broker may send ahead of our acknowledgements (the MQTT 5 maximum)
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our session and its queue this long while we are away
MAX_AWAITING_ACK = 60_000
# The MQTT 5 user property on a message that may have reached subscribers before.
POSSIBLE_DUPLICATE = ("edgefn-duplicate", "possible")
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
                 on_disconnect: Callable[[], None] | None = None, subscriptions_file: Path | None = None):
        self._settings, self._on_message, self._filters = settings, on_message, list(filters)
        # The broker keeps the session's subscriptions across restarts: what was subscribed before (by
        # an earlier release, with other triggers) is recorded here and dropped on connect.
        self._subscriptions_file = subscriptions_file
        self._subscribed = set(self._recorded())  # as the broker's session last had them, as far as we know
        self._on_disconnect = on_disconnect
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        # Unbounded: a bounded window makes paho queue messages past it and send a later publish
        # before them once room frees up (it does after a reconnect), and results would reorder.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)  # keep every unsent output while the broker is away
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
        client.on_subscribe = self._resubscribed
        client.on_socket_open = _no_delay
        self._client = client
        self._acks: dict[int, tuple[OnAcked, UserProperties]] = {}  # by mid: awaiting the broker's PUBACK
        self._room = threading.Condition()  # mids wrap at 65,535: bound what awaits a PUBACK
        self._early: dict[int, str | None] = {}  # PUBACKs that raced ahead of publish() returning
        self._lock = threading.Lock()
        self._filters_lock = threading.Lock()  # the filters, and subscribing to them on connect
        # Published while disconnected and until paho has resent the session's messages; None
        # while messages go straight out.
        self._held: deque[tuple[str, bytes, OnAcked, Sequence[tuple[str, str]]]] | None = deque()
        self._held_lock = threading.Lock()
        self.connected = threading.Event()
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        s = self._settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self._client.connect_async(s.broker_host, s.broker_port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait_connected(self, timeout: float) -> None:
        if not self.connected.wait(timeout):
            raise BrokerError(f"no connection to {self._settings.broker} within {timeout:g} s"
                              + (f": {self.last_error}" if self.last_error else ""))

    # -- ingress ---------------------------------------------------------------------------------
    def _connected(self, client: mqtt.Client, _u: object, _flags: object, reason: mqtt.ReasonCode, _p: object) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.error("%s (retrying with backoff)", self.last_error)
            return
        self.last_error = None
        with self._filters_lock:  # set_filters sees the filters subscribed here, or changes them before
            if self._filters:
                client.subscribe([(f, 1) for f in self._filters])  # its SUBACK releases the held messages
            else:
                self._release_held()
            stale = sorted(self._subscribed - set(self._filters))
            if stale:
                client.unsubscribe(stale)
            self._record(self._filters)
            self.connected.set()
        log.info("connected to %s", self._settings.broker)

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
            self._client.subscribe([(f, 1) for f in added])
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

    def _connect_failed(self, _client: mqtt.Client, _u: object) -> None:
        # paho calls this from inside its `except OSError:`: the exception says why (refused,
        # unreachable, certificate verify failed, ...).
        reason = sys.exc_info()[1]
        self.last_error = f"cannot connect to {self._settings.broker}" + (f": {reason}" if reason else "")
        log.warning("%s (retrying with backoff)", self.last_error)

    def _disconnected(self, _c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        with self._held_lock:
            if self._held is None:
                self._held = deque()
        with self._lock:
            # paho sends these again after the reconnect, packing their properties afresh: the
            # broker may have passed them on already, so the copies say so.
            for _, props in self._acks.values():
                props.add(POSSIBLE_DUPLICATE)
        if self._on_disconnect is not None:
            self._on_disconnect()
        if reason.value != 0 and was_connected:  # after a refusal, keep the refusal's reason
            self.last_error = f"disconnected: {reason}"
            log.warning("%s (reconnecting)", self.last_error)


    def _message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
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
        """Acknowledge an event received at `qos`; QoS 0 has nothing to acknowledge (a PUBACK for one
        is a protocol error: the broker drops the connection)."""
        if qos > 0:
            self._client.ack(mid, qos)

    # -- egress ----------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, on_acked: OnAcked,
                user_properties: Sequence[tuple[str, str]] = ()) -> None:
        """Publish at QoS1; `on_acked(None)` once the broker has it, `on_acked(reason)` if it refused.

        Blocks while MAX_AWAITING_ACK messages await their PUBACK, since paho's message ids wrap
        at 65,535 and a reused id would overwrite a queued message."""
        with self._held_lock:
            if self._held is not None:
                self._held.append((topic, payload, on_acked, user_properties))
                return
        with self._room:
            while len(self._acks) >= MAX_AWAITING_ACK:
                self._room.wait(1.0)
        self._send(topic, payload, on_acked, user_properties)

    def _resubscribed(self, *_a: object) -> None:
        self._release_held()

    def _release_held(self) -> None:
        """Send what was held, in order, then let publish() send directly (paho's thread)."""
        while True:
            with self._held_lock:
                if not self._held:
                    self._held = None
                    return
                item = self._held.popleft()
            try:
                self._send(*item)
            except Exception as exc:  # the caller's callback hears of it; the rest still go out
                item[2](f"not published: {exc}")

    def _send(self, topic: str, payload: bytes, on_acked: OnAcked, user_properties: Sequence[tuple[str, str]]) -> None:
        # Not under self._lock: paho calls on_publish holding its own mutex, which publish() takes.
        props = UserProperties(user_properties)
        info = self._client.publish(topic, payload, qos=1, properties=props)  # type: ignore[arg-type]
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BrokerError(f"publish to {topic}: {mqtt.error_string(info.rc)}")
        with self._lock:
            early = self._early.pop(info.mid, _NOT_YET)
            if early is _NOT_YET:
                self._acks[info.mid] = (on_acked, props)
        if early is not _NOT_YET:
            on_acked(early)

    def _published(self, _c: mqtt.Client, _u: object, mid: int, reason: mqtt.ReasonCode, _p: object) -> None:
        refused = str(reason) if reason.is_failure else None
        with self._lock:
            entry = self._acks.pop(mid, None)
            if entry is None:
                self._early[mid] = refused
        if entry is not None:
            with self._room:
                self._room.notify_all()
            entry[0](refused)
