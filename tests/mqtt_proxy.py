"""A loopback TCP proxy between a client and mosquitto that drops chosen broker-to-client packets.

mosquitto 2.0.16-2.0.20 drop any packet to a client (PUBACK, SUBACK, ...) once that client has
`max_queued_messages` packets unwritten; 2.0.11 never does. This proxy makes those drops happen
on any version, deterministically: `drop(kind, n, connection)` decides for the n-th packet of a
kind (4 = PUBACK, 9 = SUBACK, ...) on the connection-th connection (both counted from 1).
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Callable

from edgefn.mqtt.local_broker import free_port

PUBACK, SUBACK = 4, 9


class DroppingProxy:
    def __init__(self, broker_port: int, drop: Callable[[int, int, int], bool]):
        self.port = free_port()
        self._broker_port, self._drop = broker_port, drop
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._connections = 0
        self.dropped: Counter[int] = Counter()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            broker = socket.create_connection(("127.0.0.1", self._broker_port))
            self._connections += 1
            self._sockets += [client, broker]
            threading.Thread(target=self._copy, args=(client, broker), daemon=True).start()
            threading.Thread(target=self._filter, args=(broker, client, self._connections), daemon=True).start()

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _close(src, dst)

    def _filter(self, src: socket.socket, dst: socket.socket, connection: int) -> None:
        seen: Counter[int] = Counter()
        reader = src.makefile("rb")
        try:
            while header := reader.read(1):
                length, shift, raw = 0, 0, bytearray()
                while True:
                    byte = reader.read(1)
                    raw += byte
                    length |= (byte[0] & 0x7F) << shift
                    shift += 7
                    if not byte[0] & 0x80:
                        break
                body = reader.read(length)
                kind = header[0] >> 4
                seen[kind] += 1
                if self._drop(kind, seen[kind], connection):
                    self.dropped[kind] += 1
                    continue
                dst.sendall(header + bytes(raw) + body)
        except (OSError, IndexError):
            pass
        _close(src, dst)

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            _close(s)


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
