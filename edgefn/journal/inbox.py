"""The durable journal: an inbox of events received and an outbox of results not yet delivered.

An event is committed to the inbox before the broker gets its PUBACK. Once every function it
triggered has answered, it leaves the inbox in the same transaction that puts those of its
outputs the broker has not acknowledged yet into the outbox (`settle`); an output leaves the
outbox when its PUBACK comes. Most outputs are acknowledged before the daemon settles (it does so
every 50 ms), so the outbox is written only while the broker is slow or away, and a crash after
an answer re-sends that answer instead of running the function again.

SQLite in WAL mode. `synchronous=NORMAL` makes a commit durable against a crash of the process
(SIGKILL) at the cost of a few microseconds; `durability="full"` also survives power loss at the
cost of an fsync per commit. After a restart, `outbox()` returns the undelivered outputs in the
order they were answered, and `pending()` every event not yet answered, in arrival order: the
daemon publishes the first again and runs the second again, marking both as possible duplicates.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from edgefn.events import Event, Message

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_ms REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
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
        self._db.execute("PRAGMA busy_timeout=10000")  # another process on the same file waits, not fails
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]

    def append(self, topic: str, payload: bytes) -> Event:
        """Commit one received event; returns it with its journal id."""
        return self.append_many([(topic, payload, time.time() * 1000.0)])[0]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: all of it is committed, or none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def append_many(self, items: list[tuple[str, bytes, float]]) -> list[Event]:
        """Commit received events (topic, payload, received_ms) in one transaction."""
        events = []
        with self._transaction() as db:
            for topic, payload, received_ms in items:
                cur = db.execute("INSERT INTO inbox (topic, payload, received_ms) VALUES (?, ?, ?)",
                                 (topic, payload, received_ms))
                events.append(Event(str(cur.lastrowid), topic, payload, received_ms))
        return events

    def settle(self, answered: Iterable[str], undelivered: list[tuple[str, Message]],
               delivered: Iterable[int] = ()) -> list[int]:
        """In one transaction: forget the answered events, keep their undelivered outputs (event id,
        message) in the outbox, and forget outbox rows since delivered. Returns the new rows' ids."""
        done = [(int(e),) for e in answered]
        gone = [(int(o),) for o in delivered]
        ids = []
        with self._transaction() as db:
            for event_id, message in undelivered:
                cur = db.execute("INSERT INTO outbox (event, topic, payload) VALUES (?, ?, ?)",
                                 (event_id, message.topic, message.payload))
                ids.append(cur.lastrowid)
            db.executemany("DELETE FROM inbox WHERE seq = ?", done)
            db.executemany("DELETE FROM outbox WHERE seq = ?", gone)
        return ids

    def pending(self) -> list[Event]:
        """Events not yet answered, in arrival order (after a restart: to run again)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload, received_ms FROM inbox ORDER BY seq").fetchall()
        return [Event(str(seq), topic, bytes(payload), received_ms, replayed=True)
                for seq, topic, payload, received_ms in rows]

    def heads(self) -> list[tuple[Event, int]]:
        """Events not yet answered, in arrival order, without their payloads (event, payload size):
        what a restart routes; the payloads are read as the functions have room (`events`)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, length(payload), received_ms FROM inbox ORDER BY seq").fetchall()
        return [(Event(str(seq), topic, b"", received_ms, replayed=True), size) for seq, topic, size, received_ms in rows]

    def events(self, ids: list[str]) -> list[Event]:
        """The journaled events with these ids, whole, in the order asked (an id no longer there is left out)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT seq, topic, payload, received_ms FROM inbox WHERE seq IN ({marks})",
                                    [int(i) for i in ids]).fetchall()
        found = {str(seq): Event(str(seq), topic, bytes(payload), received_ms)
                 for seq, topic, payload, received_ms in rows}
        return [found[i] for i in ids if i in found]

    def outbox(self) -> list[tuple[int, str, Message]]:
        """Outputs not yet delivered (row id, event id, message), in the order they were answered."""
        with self._lock:
            rows = self._db.execute("SELECT seq, event, topic, payload FROM outbox ORDER BY seq").fetchall()
        return [(seq, event, Message(topic, bytes(payload))) for seq, event, topic, payload in rows]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
