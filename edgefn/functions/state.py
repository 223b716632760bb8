"""Per-function state behind host.state-get / host.state-set: small values (windows, counters)
that outlive instance renewal and daemon restarts.

SQLite under the state dir, read through an in-memory copy. Each set is committed at once, so
state is as durable as the inbox; with at-least-once delivery a replayed event may apply its
update twice, so state updates should be idempotent where that matters. Bounds per function:
keys up to 256 bytes, values up to 64 KiB, 1 MiB in all; an empty value removes the key.

A damaged file is moved aside and a fresh one started (`damage` says so); a set on a full disk
raises DiskFull and changes nothing.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from edgefn.files import open_sqlite, storage_error

log = logging.getLogger("edgefn.state")

MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_TOTAL_BYTES = 1024 * 1024


class StateLimitError(ValueError):
    """A state-set past the bounds; the guest call traps with this message."""


def _setup(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS state (function TEXT, key TEXT, value BLOB, PRIMARY KEY (function, key))")


class StateStore:
    def __init__(self, path: Path | str):
        self._name = Path(path).name
        self._db, self.damage = open_sqlite(path, _setup)  # damage: a damaged file moved aside
        if self.damage:
            log.error("%s; function state starts empty", self.damage)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], bytes] = {
            (fn, key): bytes(value) for fn, key, value in self._db.execute("SELECT function, key, value FROM state")}
        self._totals: dict[str, int] = {}
        for (fn, key), value in self._values.items():
            self._totals[fn] = self._totals.get(fn, 0) + len(key.encode()) + len(value)

    def get(self, function: str, key: str) -> bytes | None:
        return self._values.get((function, key))

    def set(self, function: str, key: str, value: bytes) -> None:
        if len(key.encode()) > MAX_KEY_BYTES:
            raise StateLimitError(f"state key longer than {MAX_KEY_BYTES} bytes")
        if len(value) > MAX_VALUE_BYTES:
            raise StateLimitError(f"state value of {len(value)} bytes is over {MAX_VALUE_BYTES // 1024} KiB")
        with self._lock:
            old = self._values.get((function, key))
            size = len(key.encode())
            total = self._totals.get(function, 0) - (size + len(old) if old is not None else 0)
            if value and total + size + len(value) > MAX_TOTAL_BYTES:
                raise StateLimitError(f"state of {function} would pass {MAX_TOTAL_BYTES // 1024} KiB")
            try:
                if value:
                    self._db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", (function, key, value))
                else:
                    self._db.execute("DELETE FROM state WHERE function = ? AND key = ?", (function, key))
            except sqlite3.OperationalError as exc:  # a full disk: the guest gets one line, the store is unchanged
                raise storage_error(self._name, exc) from None
            if value:
                self._values[(function, key)] = bytes(value)
                self._totals[function] = total + size + len(value)
            else:
                self._values.pop((function, key), None)
                self._totals[function] = total

    def close(self) -> None:
        with self._lock:
            self._db.close()
