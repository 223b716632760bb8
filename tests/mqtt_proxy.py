"""A loopback TCP proxy between a client and mosquitto that drops chosen broker-to-client packets.

mosquitto 2.0.16-2.0.20 drop any packet to a client (PUBACK, SUBACK, ...) once that client has
`max_queued_messages` packets unwritten; 2.0.11 never does. This proxy makes those drops happen
on any version, deterministically: `drop(kind, n, connection)` decides for the n-th packet of a
kind (4 = PUBACK, 9 = SUBACK, ...) on a client id's connection-th connection (both counted from 1:
the daemon's events and results sessions are two client ids, each counted on its own).

`read_slowly` makes the broker read a client id's stream late, one packet per `pace` seconds, as a
busy mosquitto does (it reads one packet per socket per pass of its loop). `drop_sent` decides, as
`drop` does, for the packets a client sends after its CONNECT (8 = SUBSCRIBE, ...).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

from edgefn.mqtt.local_broker import free_port

PUBACK, SUBSCRIBE, SUBACK = 4, 8, 9


class DroppingProxy:
    def __init__(self, broker_port: int, drop: Callable[[int, int, int], bool] = lambda *_: False,
                 drop_sent: Callable[[int, int, int], bool] | None = None):
        self.port = free_port()
        self._broker_port, self._drop, self._drop_sent = broker_port, drop, drop_sent
        self.read_slowly: dict[str, float] = {}  # client id -> seconds per packet it sends
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._connections: Counter[str] = Counter()  # by client id
        self.dropped: Counter[int] = Counter()
        self.dropped_sent: Counter[int] = Counter()  # of the clients' packets
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            broker = socket.create_connection(("127.0.0.1", self._broker_port))
            self._sockets += [client, broker]
            threading.Thread(target=self._open, args=(client, broker), daemon=True).start()

    def _open(self, client: socket.socket, broker: socket.socket) -> None:
        """Pass the CONNECT on, then copy both ways, filtering what the broker sends."""
        try:
            connect = _read_packet(client.makefile("rb", buffering=0))
        except (OSError, IndexError):
            return _close(client, broker)
        client_id = _client_id(connect)
        self._connections[client_id] += 1
        broker.sendall(connect)
        pace, connection = self.read_slowly.get(client_id), self._connections[client_id]
        copy = partial(self._copy_packets, pace=pace or 0.0, connection=connection) if pace or self._drop_sent else self._copy
        threading.Thread(target=copy, args=(client, broker), daemon=True).start()
        self._filter(broker, client, self._connections[client_id])

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _close(src, dst)

    def _copy_packets(self, src: socket.socket, dst: socket.socket, pace: float, connection: int) -> None:
        seen: Counter[int] = Counter()
        reader = src.makefile("rb")
        try:
            while packet := _read_packet(reader):
                time.sleep(pace)
                kind = packet[0] >> 4
                seen[kind] += 1
                if self._drop_sent is not None and self._drop_sent(kind, seen[kind], connection):
                    self.dropped_sent[kind] += 1
                    continue
                dst.sendall(packet)
        except (OSError, IndexError):
            pass
        _close(src, dst)

    def _filter(self, src: socket.socket, dst: socket.socket, connection: int) -> None:
        seen: Counter[int] = Counter()
        reader = src.makefile("rb")
        try:
            while packet := _read_packet(reader):
                kind = packet[0] >> 4
                seen[kind] += 1
                if self._drop(kind, seen[kind], connection):
                    self.dropped[kind] += 1
                    continue
                dst.sendall(packet)
        except (OSError, IndexError):
            pass
        _close(src, dst)

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            _close(s)


def _read_packet(reader) -> bytes:
    """One whole MQTT packet (b"" at the end of the stream)."""
    if not (header := reader.read(1)):
        return b""
    length, shift, raw = 0, 0, bytearray()
    while True:
        byte = reader.read(1)
        raw += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    body = b""
    while len(body) < length:  # an unbuffered reader may return less
        if not (more := reader.read(length - len(body))):
            raise OSError("the stream ended inside a packet")
        body += more
    return header + bytes(raw) + body


def _client_id(connect: bytes) -> str:
    """The client id of an MQTT 3.1.1 or 5 CONNECT packet."""
    at = 1
    while connect[at] & 0x80:  # the remaining length
        at += 1
    at += 1
    at += 2 + int.from_bytes(connect[at:at + 2], "big")  # protocol name
    level = connect[at]
    at += 1 + 1 + 2  # level, flags, keepalive
    if level == 5:
        props, shift = 0, 0
        while True:
            props |= (connect[at] & 0x7F) << shift
            shift += 7
            at += 1
            if not connect[at - 1] & 0x80:
                break
        at += props
    size = int.from_bytes(connect[at:at + 2], "big")
    return connect[at + 2:at + 2 + size].decode()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
