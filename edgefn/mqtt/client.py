"""paho's client as the daemon needs it (`broker_client`): MQTT 5 with manual acks, the settings'
credentials and TLS, no delay on writes and quick ACKs on reads (so neither side's Nagle stalls an
event), no window or queue of its own (egress keeps those), and able to stop reading from its socket
for a while: TCP's own backpressure.

Ingress holds, unacknowledged, what arrives past the inbox's bound; past a bound in bytes on those
it asks the connection to stop reading. The broker then keeps the rest (its socket to us fills and
it queues), and memory stays bounded whatever the payloads weigh. Writing goes on meanwhile (our
acknowledgements, and PINGREQs that keep the broker's keepalive happy); the bytes that wait in the
socket show the broker is there, which paho's own keepalive check is told, since it cannot read the
PINGRESP while paused. Results leave on a connection of their own (connection.py), never paused.
The same clock is kept fresh while the connection says the broker's silence is explained
(`silence_excused`: the broker alive, and behind on reading our acknowledgements).

Writing inline (plain TCP): a packet made on another thread than paho's (a worker's result) is written
to the socket by that thread, where paho would queue it and wake its own thread to write it. That hop
(a byte on paho's socket pair, its select waking, the interpreter lock changing hands twice) was 0.3-0.5
ms of an answer's way out, one event at a time. One lock orders the writers; paho's thread writes what
was queued under the same lock. paho's own packets stay with paho (written inline too, they measured no
better). Not with TLS: one SSL object must not read on one thread while it writes on another.

Reading a chunk at a time: what the socket holds is read at once (up to 64 KiB) and every whole packet in
it handled, where paho reads each packet in three reads or more, one packet per wake of its loop.

It leans on paho-mqtt 2's `loop_read`, `_packet_read`, `_packet_handle`, `_check_keepalive`, `_packet_queue`,
`_packet_write` and their state (`_in_packet`, `_last_bytes_received`, `_last_msg_out`, `_ping_t`, `_out_packet`,
`_thread`; pinned below 3 in
pyproject.toml; tests/test_connection.py pauses a real connection longer than its keepalive, keeps one
whose broker reads it late, and writes from many threads at once).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefn.config import Settings
from edgefn.errors import BrokerError

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)  # Linux only; elsewhere setsockopt fails and is ignored
_PAUSED_WAIT_S = 0.005  # the socket stays readable while paused: wait this long per loop instead of spinning
_PUBACK = struct.Struct("!BBH")  # a PUBACK with no reason code (success): its type, its length (2), the packet id
# The reason codes of a PUBACK that took the message (Success; No matching subscribers, which mosquitto says
# of an answer nobody listens to), each one object shared by every such PUBACK: nobody changes it.
_ACCEPTED = {code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in (0x00, 0x10)}
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)
_READ_CHUNK = 64 * 1024  # read from the socket at once: a burst's packets come a few hundred per read


def _no_delay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    # Small writes follow each other (an event's PUBACK and the next, one result and the next):
    # without TCP_NODELAY, Nagle holds the second until the broker's delayed ACK of the first, ~40 ms.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        pass


def _quick_ack(sock: object) -> None:
    # What we just read (an event, a PUBACK) is acknowledged at once, not after the kernel's delayed
    # ACK (40 ms): a broker with Nagle on (mosquitto's default, set_tcp_nodelay false) holds its next
    # small write to us until that ACK, so a single event waited ~44 ms. Linux resets quick-ack mode
    # by itself, hence once per read.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        pass


# Packets whose writing paho follows with nothing: a QoS0 PUBLISH (on_publish once written, under paho's
# callback lock) and a DISCONNECT (the socket closed once written) are left to paho's own writing.
_PLAIN_WRITES = frozenset({mqtt.PUBACK, mqtt.PUBREC, mqtt.PUBREL, mqtt.PUBCOMP, mqtt.SUBSCRIBE, mqtt.UNSUBSCRIBE,
                           mqtt.PINGREQ})


def _written_alike(command: int, qos: int) -> bool:
    kind = command & 0xF0
    return kind in _PLAIN_WRITES or (kind == mqtt.PUBLISH and qos > 0)


class PausableClient(mqtt.Client):
    """An `mqtt.Client` whose network loop skips reading while `paused` is set, and whose keepalive
    lets the broker be silent while `silence_excused()` says why (see `_check_keepalive`)."""

    paused = False
    heard_at = 0.0  # when bytes were last read from the broker (monotonic)
    # A PUBLISH at QoS 0 or 1 without properties (MQTT 5), which most sensors' events are: handed to this as
    # (topic, payload, mid, qos, dup) in place of on_message, not made into paho's MQTTMessage and Properties
    # (decoding those was a tenth of what intake cost). None: every PUBLISH goes paho's way.
    on_plain_publish: Callable[[str, bytes, int, int, bool], None] | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # One writer to the socket at a time, paho's thread or another. Re-entrant: before loop_start, paho
        # writes the rest of a packet from within _packet_queue (loop_write) while the inline write holds it.
        self._writing = threading.RLock()
        self._read = bytearray()  # bytes read from the socket and not handled yet: at most a part of one packet
        self._next = 0  # while handling the packets of a read: where the next one begins in `_read`

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._read.clear()  # a part of a packet of the old connection
        return super().reconnect()

    def ack_many(self, mids: list[int]) -> mqtt.MQTTErrorCode:
        """Acknowledge these QoS 1 messages (manual acks): their PUBACKs written as one, where paho
        queues, wakes its thread for and writes each apart."""
        packet = b"".join([_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids])
        return self._packet_queue(mqtt.PUBACK, packet, 0, 0)

    @property
    def buffered(self) -> bool:
        """Whether bytes of a next packet were read already (the rest of it, if any, is on its way)."""
        return len(self._read) > self._next

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        """Read what the socket holds, up to _READ_CHUNK, in one call, and handle every whole packet in it.

        paho reads a packet in three reads at least (its first byte, its length a byte at a time, the
        rest), and one packet per wake of its loop; in a burst that was most of what an event cost
        here. What is left of a packet waits in `_read` for the rest of its bytes. Packets read while
        reading is paused are handled all the same: they are in memory already (at most a chunk)."""
        try:
            data = self._sock_recv(_READ_CHUNK)
        except BlockingIOError:
            return mqtt.MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:
            self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
        if not data:
            return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        buf = self._read
        buf += data
        pos, end = 0, len(buf)
        rc = mqtt.MQTTErrorCode.MQTT_ERR_AGAIN  # all handled: paho's loop_read stops reading
        while pos + 2 <= end:
            length, mult, at = 0, 1, pos + 1  # the remaining length: a byte at a time, 7 bits each
            while at < end:
                byte = buf[at]
                length += (byte & 127) * mult
                at += 1
                if not byte & 128:
                    break
                mult *= 128
                if at - pos > 4:
                    return mqtt.MQTTErrorCode.MQTT_ERR_PROTOCOL  # past the 4 bytes MQTT allows
            else:
                break  # its length is not all here yet
            if at + length > end:
                break  # its body is not all here yet
            self._in_packet = {"command": buf[pos], "have_remaining": 1, "remaining_count": [],
                               "remaining_mult": 1, "remaining_length": length, "packet": buf[at:at + length],
                               "to_process": 0, "pos": 0}
            pos = self._next = at + length
            try:
                handled = self._packet_handle()
            except mqtt.MalformedPacket as exc:
                self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
                handled = mqtt.MQTTErrorCode.MQTT_ERR_PROTOCOL
            if handled or self._sock is None:  # an error, or the callback disconnected
                rc = handled
                break
        del buf[:pos]
        self._next = 0
        self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                           "remaining_length": 0, "packet": bytearray(), "to_process": 0, "pos": 0}
        return rc

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        with self._writing:
            return super()._packet_write()

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> mqtt.MQTTErrorCode:
        if (self._ssl or threading.current_thread() is self._thread
                or not _written_alike(command, qos) or not self._writing.acquire(blocking=False)):
            return super()._packet_queue(command, packet, mid, qos, info)
        try:
            sent = self._write_inline(packet) if not self._out_packet else 0
            if sent == len(packet):
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            # The rest is queued while the lock is held, so no other writer's bytes come between.
            return super()._packet_queue(command, packet[sent:], mid, qos, info)
        finally:
            self._writing.release()

    def _write_inline(self, packet: bytes | bytearray) -> int:
        """What of `packet` the socket took at once (the caller holds the write lock)."""
        sock = self._sock
        if sock is None:
            return 0
        try:
            sent = sock.send(packet)
        except OSError:  # it would block, or the connection is gone: paho's thread finds out
            return 0
        with self._msgtime_mutex:
            self._last_msg_out = mqtt.time_func()
        return sent

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        handler, packet, command = self.on_plain_publish, self._in_packet["packet"], self._in_packet["command"]
        qos = (command & 0x06) >> 1
        if handler is None or qos > 1 or self._protocol != mqtt.MQTTv5 or len(packet) < 2:
            return super()._handle_publish()
        end = 2 + (packet[0] << 8 | packet[1])  # the topic's end
        at = end + 2 if qos else end  # the packet id, then the properties' length
        if at >= len(packet) or packet[at] != 0:  # properties (a hop count, ...), or a malformed packet: paho's
            return super()._handle_publish()
        try:
            topic = packet[2:end].decode()
        except UnicodeDecodeError:
            return super()._handle_publish()
        mid = packet[end] << 8 | packet[end + 1] if qos else 0
        with self._in_callback_mutex:
            try:
                handler(topic, bytes(packet[at + 1:]), mid, qos, bool(command & 0x08))
            except Exception as err:  # as paho does with on_message
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise
        return self._send_puback(mid) if qos and not self._manual_ack else mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: str) -> mqtt.MQTTErrorCode:
        """A PUBACK that took the message and says nothing more (its packet id, a reason code of `_ACCEPTED`,
        no properties), which nearly every answer's is, handed over without paho's decoding into a new
        ReasonCode and Properties (a tenth of what publishing an answer cost the daemon); any other (a
        refusal, properties) goes paho's way."""
        packet = self._in_packet["packet"]
        reason = packet[2] if len(packet) > 2 else 0
        if (cmd != "PUBACK" or self._protocol != mqtt.MQTTv5 or len(packet) > 4 or reason not in _ACCEPTED
                or packet[3:] not in (b"", b"\x00")):
            return super()._handle_pubackcomp(cmd)  # type: ignore[arg-type]
        mid = packet[0] << 8 | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _ACCEPTED[reason], _NO_PROPERTIES)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    @staticmethod
    def silence_excused() -> bool:
        return False

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        if not self.paused:
            rc = super().loop_read(max_packets)
            if rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.heard_at = time.monotonic()
                _quick_ack(self.socket())
            return rc
        time.sleep(_PAUSED_WAIT_S)
        # Bytes are waiting to be read (nothing reads them while paused): the broker is alive. Noted after
        # the wait, right before paho's keepalive check: a thread stalled in the wait for a keepalive (a
        # loaded board) would otherwise come back to a stale time and drop a live session.
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        # No PINGRESP is awaited (it may be among those bytes, unread). paho's loop_misc drops the session
        # once its last PINGREQ is a keepalive old with no PINGRESP, relying on _check_keepalive to send
        # the next one first; that check skips it (while still resetting the clock it waits on) when paho
        # stamped the last one a little after the `now` it compares with, and the session was dropped at
        # once (the CI saw it under load). With none awaited, _check_keepalive sends a PINGREQ every
        # keepalive, so the broker still hears from us, and loop_misc has nothing to time out.
        self._ping_t = 0.0
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _check_keepalive(self) -> None:
        # paho drops a session that has heard nothing, not even a PINGRESP, for a keepalive after its
        # PINGREQ. The connection may know the broker is alive and only behind on reading what we
        # sent (our PINGREQ waits behind it): then the silence is not a dead broker.
        if self.silence_excused():
            with self._msgtime_mutex:
                self._last_bytes_received = mqtt.time_func()
        super()._check_keepalive()


def broker_client(settings: Settings, client_id: str) -> PausableClient:
    """A client for the settings' broker, not yet connected; TLS settings paho refuses raise BrokerError."""
    client = PausableClient(CallbackAPIVersion.VERSION2, client_id=client_id,
                            protocol=mqtt.MQTTv5, manual_ack=True)
    # Unbounded: the window is egress's (edgefn/mqtt/egress.py); paho only ever holds what fits it.
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
    client.on_socket_open = _no_delay
    return client
