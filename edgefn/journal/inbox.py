"""The durable inbox: an event is committed here before the broker gets its PUBACK, and leaves
only after every output it produced has been acknowledged by the broker.

SQLite in WAL mode. `synchronous=NORMAL` makes a commit durable against a crash of the process
(SIGKILL) at the cost of a few microseconds; `durability="full"` also survives power loss at the
cost of an fsync per commit. After a restart, `pending()` returns every event not yet done, in
arrival order, and the daemon runs them again (consumers drop duplicates by `event_id`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from edgefn.events import Event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_ms REAL NOT NULL
);
"""


class Inbox:
    """Events received and not yet answered; one writer connection shared under a lock."""

    def __init__(self, path: Path | str, durability: Literal["process", "full"] = "process"):
        if str(path) != ":memory:":  # ":memory:" keeps nothing across a crash (--journal memory)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=10000")  # the ingress process and the daemon both write
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]

    def append(self, topic: str, payload: bytes) -> Event:
        """Commit one received event; returns it with its journal id."""
        return self.append_many([(topic, payload, time.time() * 1000.0)])[0]

    def append_many(self, items: list[tuple[str, bytes, float]]) -> list[Event]:
        """Commit received events (topic, payload, received_ms) in one transaction."""
        events = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for topic, payload, received_ms in items:
                    cur = self._db.execute("INSERT INTO inbox (topic, payload, received_ms) VALUES (?, ?, ?)",
                                           (topic, payload, received_ms))
                    events.append(Event(str(cur.lastrowid), topic, payload, received_ms))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return events

    def done(self, event_ids: Iterable[str]) -> None:
        """Forget answered events (one transaction for the batch)."""
        rows = [(int(e),) for e in event_ids]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM inbox WHERE seq = ?", rows)
            self._db.execute("COMMIT")

    def pending(self) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload, received_ms FROM inbox ORDER BY seq").fetchall()
        return [Event(str(seq), topic, bytes(payload), received_ms) for seq, topic, payload, received_ms in rows]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
