"""The daemon's one connection to the broker (paho-mqtt 2): the session (connect, reconnect, the
watchdog) and the wiring of paho's client (`client.py`), egress (`egress.py`), subscriptions
(`subscriptions.py`) and ingress (the daemon's `on_message`, `ack`, `pause_reading`).

MQTT 5. Ingress is acknowledged by hand (`manual_ack=True`): the daemon calls `ack(mid)` only
once the event is durable, so a crash before that means the broker redelivers it. The session
is persistent (clean start off, a session expiry) so that the broker keeps the subscription and
what it queued while the daemon was away. The CONNECT asks for a large Receive Maximum: the
broker may then send that many QoS1 messages before our acknowledgements, instead of the 20 it
allows an MQTT 3.1.1 client; mosquitto counts those as in flight, not against its
`max_queued_messages` (1000), past which it drops. That, not raw speed, is what keeps a burst
from being lost at the broker while the inbox catches up.

Lost PUBACKs (mosquitto 2.0.16-2.0.20 drop them, like SUBACKs) are recovered by reconnecting,
which makes both sides resend: egress asks for it when a PUBACK for a later message shows an
earlier one's was lost; the watchdog, when nothing is heard from the broker for `ack_timeout`
while publishes wait (acknowledgements stopped). The watchdog also asks again for late SUBACKs.

QoS 0 events are passed on with qos=0 and never acknowledged (a PUBACK for one is a protocol
error: the broker drops the connection).

Locks. paho calls back holding its own mutexes, so nothing of ours that paho's thread needs may be
held while calling paho (egress's `_handing` is the one exception, see egress.py). Nested, they
are taken in this order only, and no two pieces' locks are ever held together:
    paho's own -> `Egress._handing` -> `Egress._lock`
    paho's own -> `Subscriptions._filters_lock` -> `Subscriptions._lock`
    `Connection._lock` alone: whether a reconnect was asked for on this connection.
`_heard` (the last packet from the broker) is one float, stored whole: no lock. Paho's PUBACK
callback stores it before egress takes the message off, and the watchdog reads egress before it,
so the watchdog never pairs an old `_heard` with a window that has already lost its oldest message.
"""

from __future__ import annotations

import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.config import Settings
from edgefn.errors import BrokerError
from edgefn.mqtt.client import broker_client
from edgefn.mqtt.egress import Egress, OnAcked
from edgefn.mqtt.subscriptions import SUBACK_TIMEOUT_S, Subscriptions
from edgefn.observe.logs import Every

log = logging.getLogger("edgefn.mqtt")

RECEIVE_MAXIMUM = 65535  # QoS1 messages the broker may send ahead of our acknowledgements (the MQTT 5 maximum)
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our session and its queue this long while we are away
ACK_TIMEOUT_S = 30.0  # publishes waiting and nothing heard from the broker this long: reconnect
KEEPALIVE_S = 30
PAUSED_ACK_WAIT_S = 0.2
OnMessage = Callable[[str, bytes, int, int, bool], None]  # topic, payload, mid, qos, dup


class Connection:
    def __init__(self, settings: Settings, on_message: OnMessage, filters: Sequence[str],
                 on_disconnect: Callable[[], None] | None = None, subscriptions_file: Path | None = None, *,
                 receive_maximum: int = RECEIVE_MAXIMUM, ack_timeout: float = ACK_TIMEOUT_S,
                 suback_timeout: float = SUBACK_TIMEOUT_S, keepalive: int = KEEPALIVE_S):
        self._settings, self._on_message = settings, on_message
        self._receive_maximum, self._ack_timeout, self._keepalive = receive_maximum, ack_timeout, keepalive
        self._on_disconnect = on_disconnect
        client = broker_client(settings)
        client.on_connect = self._connected
        client.on_connect_fail = self._connect_failed
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        client.on_publish = self._published
        client.on_subscribe = self._suback
        self._client = client
        self.connected = threading.Event()  # set by subscriptions, once a CONNACK's SUBSCRIBE is sent
        self._egress = Egress(client, self._reconnect)
        client.must_read = self._must_read  # type: ignore[method-assign]
        self._subscriptions = Subscriptions(client, filters, self.connected, subscriptions_file, suback_timeout)
        self._lock = threading.Lock()  # whether a reconnect was asked for on this connection
        # The last PUBLISH, PUBACK or SUBACK from the broker: one float, stored whole by paho's thread
        # (and by pause_reading), read by the watchdog; no lock (the PUBLISH path never took one).
        self._heard = time.monotonic()
        self._reconnecting = False  # a reconnect was asked for on this connection
        self._stopped = threading.Event()
        self._watch: threading.Thread | None = None
        self._lost_acks = Every(10.0)
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

    def _must_read(self) -> bool:
        """While paused: read anyway once a result has waited PAUSED_ACK_WAIT_S for its PUBACK (it
        sits behind events in the broker's stream to us): held events may then pass their bound in
        bytes for a moment, but publishing never stalls on our own pause."""
        oldest = self._egress.oldest_sent_at()
        return oldest is not None and time.monotonic() - oldest > PAUSED_ACK_WAIT_S

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading from the broker: ingress holds as much as it may in memory."""
        if paused != self._client.paused:
            self._client.paused = paused
            log.debug("%s reading from the broker", "paused" if paused else "resumed")
            if not paused:
                self._heard = time.monotonic()  # the pause was ours, not the broker's silence

    def wait_connected(self, timeout: float) -> None:
        """Until connected and subscribed: the broker has our subscriptions (its SUBACK came), so an
        event published from now on reaches us. Results do not wait for this (see the docstring)."""
        deadline = time.monotonic() + timeout
        if not self.connected.wait(timeout):
            raise BrokerError(f"no connection to {self._settings.broker} within {timeout:g} s"
                              + (f": {self.last_error}" if self.last_error else ""))
        while self.awaiting_suback and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.awaiting_suback:
            raise BrokerError(f"no SUBACK from {self._settings.broker} within {timeout:g} s")

    @property
    def awaiting_ack(self) -> int:
        """Outputs published and not yet acknowledged (queued or in flight)."""
        return self._egress.awaiting_ack

    @property
    def awaiting_suback(self) -> int:
        return self._subscriptions.awaiting_suback

    # -- connection --------------------------------------------------------------------------------
    def _connected(self, client: mqtt.Client, _u: object, _flags: object, reason: mqtt.ReasonCode,
                   props: Properties) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.error("%s (retrying with backoff)", self.last_error)
            return
        self.last_error = None
        self._egress.take_back(getattr(props, "ReceiveMaximum", 65535))
        self._heard = time.monotonic()
        with self._lock:
            self._reconnecting = False
        self._subscriptions.resubscribe()  # and marks the session connected
        log.info("connected to %s", self._settings.broker)
        self._egress.pump()

    def _connect_failed(self, _client: mqtt.Client, _u: object) -> None:
        # paho calls this from inside its `except OSError:`: the exception says why (refused,
        # unreachable, certificate verify failed, ...).
        reason = sys.exc_info()[1]
        self.last_error = f"cannot connect to {self._settings.broker}" + (f": {reason}" if reason else "")
        log.warning("%s (retrying with backoff)", self.last_error)

    def _disconnected(self, _c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._egress.hold()  # everything until the next CONNACK
        if self._on_disconnect is not None:
            self._on_disconnect()
        if reason.value != 0 and was_connected:  # after a refusal, keep the refusal's reason
            self.last_error = f"disconnected: {reason}"
            log.warning("%s (reconnecting)", self.last_error)

    def _reconnect(self, why: str) -> None:
        """Drop the connection as a network fault would; paho reconnects and both sides resend."""
        sending = self._egress.window_open
        with self._lock:
            if self._reconnecting or not sending:
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
        tick = max(0.05, min(1.0, self._ack_timeout / 4, self._subscriptions.suback_timeout / 4))
        while not self._stopped.wait(tick):
            now = time.monotonic()
            # Egress first: a PUBACK marks the broker heard before it takes its message off.
            oldest = self._egress.oldest_sent_at()
            stalled = (oldest is not None and not self._client.paused
                       and now - self._heard > self._ack_timeout and now - oldest > self._ack_timeout)
            if stalled:
                self._reconnect(f"no acknowledgement from the broker for {self._ack_timeout:g} s")
            self._subscriptions.retry_late(now)

    # -- subscriptions ---------------------------------------------------------------------------
    def set_filters(self, filters: Sequence[str]) -> None:
        """Subscribe to `filters` instead of the current ones (a new release's triggers). While
        disconnected, the next connect subscribes to them."""
        self._subscriptions.set_filters(filters)

    def _suback(self, _c: mqtt.Client, _u: object, mid: int, reasons: list[mqtt.ReasonCode], _p: object) -> None:
        self._heard = time.monotonic()
        self._subscriptions.acknowledged(mid, reasons)

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
        """See `Egress.publish`: QoS1, in order across reconnects; `on_acked` once, at the PUBACK."""
        self._egress.publish(topic, payload, on_acked, user_properties)

    def _published(self, _c: mqtt.Client, _u: object, mid: int, reason: mqtt.ReasonCode, _p: object) -> None:
        self._heard = time.monotonic()  # before egress takes the message off: see the watchdog
        self._egress.acknowledged(mid, str(reason) if reason.is_failure else None)
