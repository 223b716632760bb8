"""The daemon's connections to the broker (paho-mqtt 2): two sessions, one for the events that come
in and one for the results that go out, each a `_Link` (a paho client, connect, reconnect, what was
last heard), and the wiring of paho's client (`client.py`), egress (`egress.py`), subscriptions
(`subscriptions.py`) and ingress (the daemon's `on_message`, `ack`, `pause_reading`).

Why two. A broker writes to a client in one stream: the PUBACKs for our results queue behind the
events it sends us. Under overload that stream is tens of thousands of events long (the Receive
Maximum below), read only as fast as the inbox takes them, or not at all while ingress has paused
reading; a stock mosquitto allows 20 of our publishes in flight, so results went out 20 per pass
through that stream: 219 of 110,219 events answered in a 5-minute overload, with 60,000 results
queued. On a connection of their own, the PUBACKs come back at once, whatever waits for us on the
other one. The results session is `<client id>-results`, clean: the broker keeps nothing for it
(egress keeps what awaits a PUBACK and sends it again after a reconnect). A broker's ACL must allow
both client ids to connect.

The events session. MQTT 5. Ingress is acknowledged by hand (`manual_ack=True`): the daemon calls
`ack(mid)` only once the event is durable, so a crash before that means the broker redelivers it.
The session is persistent (clean start off, a session expiry) so that the broker keeps the
subscription and what it queued while the daemon was away. The CONNECT asks for a large Receive
Maximum: the broker may then send that many QoS1 messages before our acknowledgements, instead of
the 20 it allows an MQTT 3.1.1 client; mosquitto counts those as in flight, not against its
`max_queued_messages` (1000), past which it drops. That, not raw speed, is what keeps a burst from
being lost at the broker while the inbox catches up. (Measured since, bench/intake.py on mosquitto 2.0.11: a burst
of 30,000 that came faster than the subscriber read it still lost thousands at the broker, counted by
its $SYS/broker/publish/messages/dropped, a plain paho client's as well as ours: reading fast matters too.) QoS 0 events are passed on with qos=0 and never
acknowledged (a PUBACK for one is a protocol error: the broker drops the connection). The CONNECT
also sets a Maximum Packet Size (`maximum_packet_size`): a payload far over `max_payload_bytes` is
dropped by the broker, never read whole into the daemon's memory only to be cut to its head (one
200 MB publish raised the daemon's peak RSS from 126 to 730 MB). The broker tells neither us nor the
sender (mosquitto logs it), so nothing here counts it.

The results session sends within what its CONNACK allows (`limits.py`: Maximum QoS, Retain
Available, Receive Maximum, Maximum Packet Size): the broker drops a connection that exceeds them,
and egress's resending made that a reconnect loop.

Lost PUBACKs (mosquitto 2.0.16-2.0.20 drop them, like SUBACKs) are recovered by reconnecting the
results session, which makes egress resend: egress asks for it when a PUBACK for a later message
shows an earlier one's was lost; the watchdog, when nothing is heard from the broker for
`ack_timeout` while publishes wait (acknowledgements stopped). The watchdog also asks again for
late SUBACKs.

Locks. paho calls back holding its own mutexes, so nothing of ours that paho's thread needs may be
held while calling paho (egress's `_handing` is the one exception, see egress.py). Nested, they
are taken in this order only, and no two pieces' locks are ever held together:
    paho's own -> `Egress._handing` -> `Egress._lock`
    paho's own -> `Subscriptions._filters_lock` -> `Subscriptions._lock`
    `Connection._lock` alone: whether a reconnect was asked for on the results session.
A link's `heard` (the last packet from the broker) is one float, stored whole: no lock. Paho's
PUBACK callback stores it before egress takes the message off, and the watchdog reads egress before
it, so the watchdog never pairs an old `heard` with a window that has already lost its oldest message.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.config import Settings
from edgefn.errors import BrokerError
from edgefn.events import PRIORITIES, Priority
from edgefn.mqtt.client import broker_client
from edgefn.mqtt.egress import Egress, OnAcked
from edgefn.mqtt.limits import BrokerLimits
from edgefn.mqtt.subscriptions import SUBACK_TIMEOUT_S, Subscriptions
from edgefn.observe.logs import Every
from edgefn.observe.refusals import BrokerRefusals
from edgefn.protocol.outputs import hop_of

log = logging.getLogger("edgefn.mqtt")

RECEIVE_MAXIMUM = 65535  # QoS1 messages the broker may send ahead of our acknowledgements (the MQTT 5 maximum)
# Besides its payload, an event's PUBLISH carries its topic (at most 64 KiB) and properties: allowed
# as much again for those, so that no payload up to max_payload_bytes is ever dropped for its packet.
PACKET_ALLOWANCE = 128 * 1024
MQTT_MAX_PACKET = 268_435_460  # the largest packet MQTT can frame (a 4-byte remaining length, and its header)
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our session and its queue this long while we are away
ACK_TIMEOUT_S = 30.0  # publishes waiting and nothing heard from the broker this long: reconnect
KEEPALIVE_S = 30
MAX_SILENCE_S = 300.0  # the longest the events session may hear nothing while its silence is excused
CONNACK_WAIT_S = 5.0  # a connection open this long with no CONNACK: say the port may not be a broker's
RESULTS_SUFFIX = "-results"  # the results session's client id: the events session's, and this
PRIORITY_SUFFIX = "-{priority}"  # a high or low priority class's events session: the client id, and this
# topic, payload, mid, qos, dup, its session's class, its hop count (edgefn-hop)
OnMessage = Callable[[str, bytes, int, int, bool, Priority, int], None]


def _by_priority(filters: Sequence[str] | Mapping[Priority, Sequence[str]]) -> dict[Priority, list[str]]:
    if isinstance(filters, Mapping):
        return {p: list(f) for p, f in filters.items()}
    return {"normal": list(filters)}


def _records_filters(path: Path) -> bool:
    """Whether a subscriptions file records filters the broker may still hold for its session."""
    try:
        return bool(json.loads(path.read_bytes()))
    except (OSError, ValueError):
        return False


class _Link:
    """One session with the broker: its paho client, connected from `start` until `stop`, reconnecting
    with backoff; why it is not connected (`last_error`); when the broker was last heard."""

    def __init__(self, settings: Settings, client_id: str, what: str, keepalive: int, *, persistent: bool,
                 receive_maximum: int | None = None, maximum_packet_size: int | None = None,
                 network_level: int = logging.WARNING):
        self.settings, self.what, self._keepalive, self._persistent = settings, what, keepalive, persistent
        self._network_level = network_level  # how loud a failure to reach the broker is logged
        self._receive_maximum, self._maximum_packet_size = receive_maximum, maximum_packet_size
        self.client = broker_client(settings, client_id)
        self.client.on_connect_fail = self._connect_failed
        self.last_error: str | None = None
        self.heard = time.monotonic()
        # Whether a CONNACK took us; since when a socket has been open without one (a port that is
        # not MQTT, or a broker that does not answer, is otherwise silent until the keepalive).
        self.up = False
        self._ever_up = False  # a broker that once took us is an MQTT broker: no "is it one?" after that
        self._refused = False
        self._open_since: float | None = None
        self._silent_said = False
        self._closed_early = Every(30.0)

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        if self._persistent:
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        if self._receive_maximum is not None:
            props.ReceiveMaximum = self._receive_maximum
        if self._maximum_packet_size is not None:
            props.MaximumPacketSize = self._maximum_packet_size
        s = self.settings
        self.client.connect_async(s.broker_host, s.broker_port, keepalive=self._keepalive,
                                  clean_start=not self._persistent, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def connected(self, reason: mqtt.ReasonCode) -> bool:
        """A CONNACK: whether the broker took us (else why not is logged and kept)."""
        if reason.is_failure:
            self.last_error = f"broker refused the {self.what} connection: {reason}"
            log.error("%s (retrying with backoff)", self.last_error)
            self._refused = True
            return False
        self.last_error = None
        self.heard = time.monotonic()
        self.up, self._ever_up, self._refused, self._silent_said = True, True, False, False
        return True

    def disconnected(self, reason: mqtt.ReasonCode, was_connected: bool) -> None:
        self.up, self._open_since = False, None
        if reason.value != 0 and was_connected:  # after a refusal, keep the refusal's reason
            self.last_error = f"{self.what} connection lost: {reason}"
            log.warning("%s (reconnecting)", self.last_error)
        elif not was_connected and not self._refused and not self._ever_up:
            # The port took the TCP connection, then closed it without a CONNACK: not an MQTT broker's?
            # (paho may also report one drop twice: the second finds the session down already.)
            self.last_error = (f"{self.settings.broker} closed the connection without answering CONNECT "
                               f"({reason}): is it an MQTT broker?")
            if self.what == "events" and (skipped := self._closed_early.due()) is not None:  # one line, not two
                log.warning("%s (retrying with backoff; %d more since the last line)", self.last_error, skipped)

    def check_connack(self, now: float, wait: float) -> None:
        """The watchdog's: one warning when a socket has been open for `wait` with no CONNACK."""
        if self.up or self.client.socket() is None:
            self._open_since = None
            return
        if self._open_since is None:
            self._open_since = now
        elif now - self._open_since > wait and not self._silent_said:
            self._silent_said = True
            self.last_error = (f"no CONNACK from {self.settings.broker} within {wait:g} s of connecting: "
                               "is it an MQTT broker?")
            log.warning("%s (still waiting)", self.last_error)

    def _connect_failed(self, _client: mqtt.Client, _u: object) -> None:
        # paho calls this from inside its `except OSError:`: the exception says why (refused,
        # unreachable, certificate verify failed, ...).
        reason = sys.exc_info()[1]
        self.last_error = f"cannot connect to {self.settings.broker}" + (f": {reason}" if reason else "")
        log.log(self._network_level, "%s (retrying with backoff)", self.last_error)

    def drop(self) -> None:
        """Drop the connection as a network fault would; paho reconnects."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            try:  # the plain socket's shutdown, under TLS too: paho's own thread sees the end
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


def maximum_packet_size(settings: Settings) -> int:
    """The largest PUBLISH an events session takes: the broker drops a larger one itself (MQTT 5's
    Maximum Packet Size), so a payload far over max_payload_bytes never reaches the daemon's memory."""
    return min(settings.max_payload_bytes + PACKET_ALLOWANCE, MQTT_MAX_PACKET)


def _client_id(settings: Settings, priority: Priority) -> str:
    return settings.client_id if priority == "normal" else settings.client_id + PRIORITY_SUFFIX.format(priority=priority)


def _subscriptions_file(normal: Path | None, priority: Priority) -> Path | None:
    if normal is None or priority == "normal":
        return normal
    return normal.with_name(f"{normal.stem}-{priority}{normal.suffix}")


class _Events:
    """One events session: a priority class's link to the broker, its subscriptions, and whether
    it is connected (set by subscriptions once a CONNACK's SUBSCRIBE is sent)."""

    def __init__(self, conn: Connection, priority: Priority, filters: Sequence[str], subscriptions_file: Path | None,
                 receive_maximum: int, keepalive: int, suback_timeout: float):
        self.priority = priority
        what = "events" if priority == "normal" else f"{priority}-priority events"
        self.link = _Link(conn._settings, _client_id(conn._settings, priority), what, keepalive, persistent=True,
                          receive_maximum=receive_maximum, maximum_packet_size=maximum_packet_size(conn._settings))
        client = self.link.client
        client.on_connect = lambda _c, _u, _f, reason, _p: conn._events_connected(self, reason)
        client.on_disconnect = lambda _c, _u, _f, reason, _p: conn._events_disconnected(self, reason)
        client.on_message = lambda _c, _u, msg: conn._on_message(
            msg.topic, msg.payload, msg.mid, msg.qos, bool(msg.dup), priority,
            hop_of(getattr(msg.properties, "UserProperty", None)))
        client.on_plain_publish = lambda topic, payload, mid, qos, dup: conn._on_message(  # no properties: hop 0
            topic, payload, mid, qos, dup, priority, 0)
        client.on_subscribe = lambda _c, _u, mid, reasons, _p: self.subscriptions.acknowledged(mid, reasons)
        client.silence_excused = lambda: conn._silence_excused(self)  # type: ignore[method-assign]
        self.acked_at = 0.0  # when this session last acknowledged an event (monotonic)
        self.connected = threading.Event()
        refusals = conn._refusals
        self.subscriptions = Subscriptions(client, filters, self.connected, subscriptions_file, suback_timeout,
                                           on_suback=refusals.subscribed if refusals is not None else None)

    @property
    def reading(self) -> bool:
        """Whether the calling thread is this session's network thread."""
        return threading.current_thread() is getattr(self.link.client, "_thread", None)


class Connection:
    def __init__(self, settings: Settings, on_message: OnMessage, filters: Sequence[str] | Mapping[Priority, Sequence[str]],
                 on_disconnect: Callable[[Priority], None] | None = None, subscriptions_file: Path | None = None, *,
                 receive_maximum: int = RECEIVE_MAXIMUM, ack_timeout: float = ACK_TIMEOUT_S,
                 suback_timeout: float = SUBACK_TIMEOUT_S, keepalive: int = KEEPALIVE_S,
                 connack_wait: float = CONNACK_WAIT_S, refusals: BrokerRefusals | None = None):
        """`filters`: by priority class (a plain list: all normal). `on_message(topic, payload, mid,
        qos, dup, priority, hop)`; `on_disconnect(priority)`: that class's session went down;
        `refusals`: where PUBACKs and SUBACKs that refuse are counted and said."""
        self._settings, self._on_message = settings, on_message
        self._refusals = refusals
        self._ack_timeout, self._connack_wait = ack_timeout, connack_wait
        self._on_disconnect = on_disconnect
        self._keepalive = keepalive
        self._subscriptions_file = subscriptions_file
        self._session_args = (receive_maximum, keepalive, suback_timeout)
        self._sessions: dict[Priority, _Events] = {}  # guarded by _lock where a swap adds one
        by_priority = _by_priority(filters)
        for priority in PRIORITIES:
            recorded = _subscriptions_file(subscriptions_file, priority)
            # A class no function uses now still gets its session while the broker may keep one for it
            # (an earlier release's filters, recorded): connecting drops those subscriptions.
            if by_priority.get(priority) or (recorded is not None and _records_filters(recorded)):
                self._open(priority, by_priority.get(priority, []))
        if not self._sessions:
            self._open("normal", [])
        # The sessions meet the same network: the events session says so, the results one at debug level.
        self._results = _Link(settings, settings.client_id + RESULTS_SUFFIX, "results", keepalive, persistent=False,
                              network_level=logging.DEBUG)
        results = self._results.client
        results.on_connect = self._results_connected
        results.on_disconnect = self._results_disconnected
        results.on_publish = self._published
        self._egress = Egress(results, self._reconnect, refusals.published if refusals is not None else None)
        self._lock = threading.Lock()  # whether a reconnect was asked for on the results session; sessions added
        self._reconnecting = False
        self._started = False
        self._stopped = threading.Event()
        self._watch: threading.Thread | None = None
        self._lost_acks = Every(10.0)
        self._limits: BrokerLimits | None = None  # what the broker allows results, once a CONNACK said

    @property
    def limits(self) -> BrokerLimits | None:
        """What the broker allows the results session (its last CONNACK), None before the first."""
        return self._limits

    def _open(self, priority: Priority, filters: Sequence[str]) -> _Events:
        receive_maximum, keepalive, suback_timeout = self._session_args
        session = _Events(self, priority, filters, _subscriptions_file(self._subscriptions_file, priority),
                          receive_maximum, keepalive, suback_timeout)
        self._sessions = {**self._sessions, priority: session}  # replaced whole: readers iterate without a lock
        return session

    @property
    def sessions(self) -> dict[Priority, str]:
        """The events sessions open: priority class -> client id."""
        return {p: _client_id(self._settings, p) for p in self._sessions}

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._results.start()
        with self._lock:
            self._started = True
            for session in self._sessions.values():
                session.link.start()
        self._watch = threading.Thread(target=self._watchdog, name="edgefn-mqtt-watch", daemon=True)
        self._watch.start()

    def stop(self) -> None:
        self._stopped.set()
        for session in self._sessions.values():
            session.link.stop()
        self._results.stop()
        if self._watch is not None:
            self._watch.join(timeout=5)

    @property
    def up(self) -> bool:
        """Every session connected: events come in (subscribed) and results go out."""
        return all(s.connected.is_set() for s in self._sessions.values()) and self._egress.window_open

    @property
    def last_error(self) -> str | None:
        """Why a session is not connected, the events ones' first."""
        for session in self._sessions.values():
            if session.link.last_error:
                return session.link.last_error
        return self._results.last_error

    def pause_reading(self, paused: bool, high: bool = False) -> None:
        """Stop (or resume) reading events from the broker, on the normal and low sessions, or (`high`)
        on the high one: ingress holds as much as it may in memory."""
        for priority, session in self._sessions.items():
            client = session.link.client
            if (priority == "high") == high and paused != client.paused:
                client.paused = paused
                log.debug("%s reading %s from the broker", "paused" if paused else "resumed", session.link.what)

    def wait_connected(self, timeout: float) -> None:
        """Until every session is up and the broker has our subscriptions (its SUBACK came), so an
        event published from now on reaches us and its result can leave."""
        deadline = time.monotonic() + timeout
        while not (self.up and not self.awaiting_suback) and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self.up:
            raise BrokerError(f"no connection to {self._settings.broker} within {timeout:g} s"
                              + (f": {self.last_error}" if self.last_error else ""))
        if self.awaiting_suback:
            raise BrokerError(f"no SUBACK from {self._settings.broker} within {timeout:g} s")

    @property
    def awaiting_ack(self) -> int:
        """Outputs published and not yet acknowledged (queued or in flight)."""
        return self._egress.awaiting_ack

    @property
    def awaiting_suback(self) -> int:
        return sum(s.subscriptions.awaiting_suback for s in self._sessions.values())

    def _watchdog(self) -> None:
        suback_timeout = min(s.subscriptions.suback_timeout for s in self._sessions.values())
        tick = max(0.05, min(1.0, self._ack_timeout / 4, suback_timeout / 4, self._connack_wait / 4))
        while not self._stopped.wait(tick):
            now = time.monotonic()
            for session in self._sessions.values():
                session.link.check_connack(now, self._connack_wait)
            # Egress first: a PUBACK marks the broker heard before it takes its message off.
            oldest = self._egress.oldest_sent_at()
            stalled = (oldest is not None and now - self._results.heard > self._ack_timeout
                       and now - oldest > self._ack_timeout)
            if stalled:
                self._reconnect(f"no acknowledgement from the broker for {self._ack_timeout:g} s")
            for session in self._sessions.values():
                session.subscriptions.retry_late(now)

    # -- the events sessions -----------------------------------------------------------------------
    def _events_connected(self, session: _Events, reason: mqtt.ReasonCode) -> None:
        if session.link.connected(reason):
            session.subscriptions.resubscribe()  # and marks the session connected
            log.info("connected to %s%s", self._settings.broker,
                     "" if session.priority == "normal" else f" ({session.link.what})")

    def _events_disconnected(self, session: _Events, reason: mqtt.ReasonCode) -> None:
        was_connected = session.connected.is_set()
        session.connected.clear()
        if self._on_disconnect is not None:
            self._on_disconnect(session.priority)
        session.link.disconnected(reason, was_connected)

    def set_filters(self, filters: Sequence[str] | Mapping[Priority, Sequence[str]]) -> None:
        """Subscribe to `filters` instead of the current ones (a new release's triggers), each class
        on its session: one is opened for a class new to it; a class gone keeps its session, with no
        subscriptions. While disconnected, the next connect subscribes to them."""
        by_priority = _by_priority(filters)
        for priority in PRIORITIES:
            wanted = by_priority.get(priority, [])
            with self._lock:
                session = self._sessions.get(priority)
                if session is None:
                    if not wanted:
                        continue
                    session = self._open(priority, wanted)
                    if self._started and not self._stopped.is_set():
                        session.link.start()
                    continue
            session.subscriptions.set_filters(wanted)

    def has_more_to_read(self) -> bool:
        """True when bytes of a next packet are already waiting on the socket of the session whose
        thread asks (used to group commits)."""
        session = next((s for s in self._sessions.values() if s.reading), None)
        client = (session or next(iter(self._sessions.values()))).link.client
        if client.buffered:  # read with the event being handled: no need to ask the socket
            return True
        sock = client.socket()
        if sock is None:
            return False
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes held by the SSL layer
        if pending is not None and pending():
            return True
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def ack(self, mid: int, qos: int = 1, priority: Priority = "normal") -> None:
        """Acknowledge an event received at `qos` on the session of `priority`; QoS 0 has nothing to
        acknowledge."""
        if qos > 0:
            session = self._sessions[priority]
            session.acked_at = time.monotonic()
            session.link.client.ack(mid, qos)

    def ack_many(self, mids: list[int], priority: Priority = "normal") -> None:
        """Acknowledge these events, received at QoS 1 on the session of `priority`, in one write."""
        session = self._sessions[priority]
        session.acked_at = time.monotonic()
        session.link.client.ack_many(mids)

    def _silence_excused(self, session: _Events) -> bool:
        """Whether the broker's silence on an events session (not even a PINGRESP) is explained.

        mosquitto reads one packet per socket per pass of its loop. Under load its loop serves each
        sensor's socket once a pass too, so our stream of PUBACKs, one for each of their events, is
        read far slower than we write it; tens of thousands (up to the Receive Maximum) may wait in
        its socket, and our PINGREQ behind them. Once the sensors stop, the broker has nothing more
        to send us until it reaches the PINGREQ: paho heard nothing for a keepalive and dropped the
        session (seen at ~2.5 min of a 2x overload), the broker resent every event in flight, and
        results stopped for a minute. The silence is excused while the broker answers on the results
        session (a PUBACK or a PINGRESP), this session had acknowledgements to read when it fell silent,
        and for at most MAX_SILENCE_S."""
        now, events = time.monotonic(), session.link.client
        # The results session hears a PUBACK or PINGRESP at least once a keepalive while the broker lives.
        return (self._results.up and now - self._results.client.heard_at < 2 * self._keepalive
                and session.acked_at > events.heard_at - self._keepalive
                and now - events.heard_at < MAX_SILENCE_S)

    # -- the results session -----------------------------------------------------------------------
    def _results_connected(self, _c: mqtt.Client, _u: object, _flags: object, reason: mqtt.ReasonCode,
                           props: Properties) -> None:
        if not self._results.connected(reason):
            return
        limits = BrokerLimits.of(props)
        self._egress.take_back(limits)
        if limits != self._limits:  # said once, not at every reconnect
            for note in limits.notes():
                log.warning("%s", note)
        self._limits = limits
        with self._lock:
            self._reconnecting = False
        log.debug("results connection to %s up", self._settings.broker)
        self._egress.pump()

    def _results_disconnected(self, _c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode,
                              _p: object) -> None:
        was_connected = self._egress.window_open
        self._egress.hold()  # everything until the next CONNACK
        self._results.disconnected(reason, was_connected)

    def publish(self, topic: str, payload: bytes, on_acked: OnAcked,
                user_properties: Sequence[tuple[str, str]] = (), qos: int = 1, retain: bool = False,
                urgent: bool = False) -> None:
        """See `Egress.publish`: in order across reconnects (`urgent` ones first); `on_acked` once, at
        the PUBACK (QoS0: once written)."""
        self._egress.publish(topic, payload, on_acked, user_properties, qos, retain, urgent)

    def _published(self, _c: mqtt.Client, _u: object, mid: int, reason: mqtt.ReasonCode, _p: object) -> None:
        self._results.heard = time.monotonic()  # before egress takes the message off: see the watchdog
        self._egress.acknowledged(mid, str(reason) if reason.is_failure else None)

    def _reconnect(self, why: str) -> None:
        """Drop the results session as a network fault would; paho reconnects and egress resends."""
        sending = self._egress.window_open
        with self._lock:
            if self._reconnecting or not sending:
                return
            self._reconnecting = True
        if (skipped := self._lost_acks.due()) is not None:
            log.warning("%s: reconnecting to have it resent (%d more since the last line)", why, skipped)
        self._results.drop()
