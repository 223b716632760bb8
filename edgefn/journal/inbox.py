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

A full disk. SQLite needs free space to delete: the pages a delete changes go to the WAL first
(measured: about one byte free per byte of events deleted). So a reserve file of `reserve_bytes`
sits next to the journal; when a settle fails for lack of space the reserve is given back and the
settle goes through. Meanwhile new events are refused whole (`DiskFull`, nothing acknowledged) and
`problem` says why; `checkpoint()` re-creates the reserve and resumes once space has returned.
`checkpoint()` also shrinks the files once the journal is empty (the WAL and the freed pages).

Giving space back. A deleted row's pages stay in the file as free pages, which new rows reuse; a
flood leaves many more of them than the journal will hold again. So the file is made with
`auto_vacuum=INCREMENTAL` (a journal of an older edgefn is converted by one `VACUUM` at start),
every free page is given back at start, and after each settle that leaves more than
`KEEP_FREE_BYTES` of them, at most `VACUUM_STEP_PAGES` go back to the filesystem in a short
transaction of their own, so a bloated journal shrinks while it runs without holding up the group
commit. The journal's free pages count as room when the disk-full state checks for space: a
journal that filled the disk itself comes out of it as it drains.

A byte budget. The journal's bytes on disk (its pages in use and its WAL) are held under
`max_bytes` (`journal_max_bytes`; by default half of the filesystem's free space at start, the
journal's own files counted as free): past it `append_many` refuses new events whole
(`JournalFull`) and `taking` is False, so that ingress holds them unacknowledged (as on a full
disk) until settles make room. A flood, QoS 0 included, so stops short of filling the disk.

A damaged file is moved aside and a fresh journal started (`damage` says so). A journal that went
back (emptied, deleted, an old copy restored) is caught by a small sidecar that records how far the
sequence came: it must never go backwards, and event ids are never reused, even after a loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from edgefn.errors import DiskFull, JournalFull, StorageError
from edgefn.events import Event, Message, Priority
from edgefn.files import open_sqlite, storage_error, write_atomic
from edgefn.observe.logs import Every

log = logging.getLogger("edgefn.journal")

RESERVE_BYTES = 8 * 1024 * 1024  # room for a settle of ~8 MB of events on a full disk (one is ~50 ms of work)
WAL_LIMIT_BYTES = 4 * 1024 * 1024  # a WAL larger than this is cut back to it after each checkpoint
KEEP_FREE_BYTES = 4 * 1024 * 1024  # free pages kept for new events to reuse; past this they go back to the disk
VACUUM_STEP_PAGES = 256  # given back after one settle at most (1 MiB of 4 KiB pages): the group commit waits for it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_ms REAL NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    priority TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL DEFAULT 1,
    retain INTEGER NOT NULL DEFAULT 0,
    properties TEXT NOT NULL DEFAULT '[]'
);
"""

_OUTBOX_DELIVERY = (("qos", "INTEGER NOT NULL DEFAULT 1"), ("retain", "INTEGER NOT NULL DEFAULT 0"),
                    ("properties", "TEXT NOT NULL DEFAULT '[]'"))  # a JSON list of [key, value]


def _setup(db: sqlite3.Connection, durability: str) -> None:
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only: lets it shrink
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    db.execute("PRAGMA busy_timeout=10000")  # another process on the same file waits, not fails
    db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
    db.executescript(_SCHEMA)
    inbox = {row[1] for row in db.execute("PRAGMA table_info(inbox)")}
    if "dropped" not in inbox:  # a journal of an older edgefn
        db.execute("ALTER TABLE inbox ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0")
    if "priority" not in inbox:  # before priorities: NULL, the event goes to every function it triggers
        db.execute("ALTER TABLE inbox ADD COLUMN priority TEXT")
    outbox = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
    for column, kind in _OUTBOX_DELIVERY:  # an outbox of an edgefn before QoS, retain and user properties
        if column not in outbox:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {kind}")


class _Reserve:
    """Disk space held in a file next to the journal, to be given back when the disk is full."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size

    @property
    def held(self) -> bool:
        return self.path.exists()

    def release(self) -> bool:
        """Give the space back; False if there was none held."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def restore(self, reusable: int = 0) -> bool:
        """Hold the space again, only if as much again is free besides (no tug of war with a filler),
        counting `reusable` bytes (the journal's free pages: room for events that the disk need not give)."""
        if self.held:
            return True
        free = shutil.disk_usage(self.path.parent).free
        if free < self.size or free + reusable < 2 * self.size:
            return False
        tmp = self.path.with_name(self.path.name + ".new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # real blocks: a sparse file would reserve nothing
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True


def _read_mark(mark: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads(mark.read_text()).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s: unreadable (%s); the journal cannot be checked for loss this time", mark.name, exc)
        return {}


class Inbox:
    """Events received and not yet answered; one writer connection shared under a lock.

    `problem` is set while the journal cannot take new events (the disk is full) and cleared when
    it can again; `damage` says what opening found, if anything was damaged or lost; `taking` is
    False while it refuses new events (a full disk, or its byte budget `max_bytes` reached)."""

    def __init__(self, path: Path | str, durability: Literal["process", "full"] = "process",
                 reserve_bytes: int = RESERVE_BYTES, max_bytes: int | None = None):
        self._lock = threading.Lock()
        self._closed = False
        self._last_mark: dict[str, int] = {}
        self._problem: str | None = None
        self.damage: str | None = None
        self._name = Path(path).name
        self._reserve: _Reserve | None = None
        self._mark: Path | None = None
        recorded: dict[str, int] = {}
        if str(path) != ":memory:":  # ":memory:" keeps nothing across a crash (--journal memory)
            path = Path(path)
            self._mark = path.with_name(path.name + ".seq")
            self._reserve = _Reserve(path.with_name(path.name + ".reserve"), reserve_bytes)
            recorded = self._last_mark = _read_mark(self._mark)
        self._db, self.damage = open_sqlite(path, lambda db: _setup(db, durability))
        self._page_size: int = self._db.execute("PRAGMA page_size").fetchone()[0]
        self.max_bytes: int | None = None  # the byte budget on disk (None: ":memory:", none)
        self._at_budget = False
        self._budget_reached = Every(60.0)
        if self._reserve is None:
            return
        self._never_go_back(recorded)
        if self.damage:
            log.error(self.damage)
        self._shrink_at_start()
        if not self._reserve.restore(self._reusable()):
            self._full(f"the journal keeps {2 * reserve_bytes >> 20} MiB free: its reserve and room for events")
        self.max_bytes = max_bytes if max_bytes is not None else self._default_budget()
        self._record()

    # -- giving space back, and the byte budget ---------------------------------------------------
    def _shrink_at_start(self) -> None:
        """Give every free page back to the filesystem; a journal made without auto_vacuum (an older
        edgefn) is converted first, by one VACUUM. Best effort: on a full disk the settles do it later."""
        try:
            if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("VACUUM")  # rewrites only the rows in use: quick for a drained journal
                log.info("%s: converted to give its free pages back (auto_vacuum)", self._name)
            self._db.executescript("PRAGMA incremental_vacuum")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:
            log.warning("%s: could not give its free space back at start (%s); settles will", self._name, exc)

    def _give_back(self, most: int) -> None:
        """Give free pages past KEEP_FREE_BYTES (all of them on a full disk: the WAL needs the room)
        back to the filesystem, `most` of them at a time (under the lock). A transaction of its own:
        on a full disk it fails alone, and a settle never does."""
        keep = KEEP_FREE_BYTES if self._problem is None else 0
        excess = self._free_pages() - keep // self._page_size
        if excess > 0:
            with contextlib.suppress(sqlite3.OperationalError):  # execute() would free one page per call
                self._db.executescript(f"PRAGMA incremental_vacuum({min(excess, most)})")
                if self._problem is not None:  # the file shrinks now, and the WAL starts over, in the room it had
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _free_pages(self) -> int:
        return self._db.execute("PRAGMA freelist_count").fetchone()[0]

    def _reusable(self) -> int:
        """Bytes of the journal's free pages: room for new events that the disk need not give."""
        return self._free_pages() * self._page_size

    def _on_disk(self) -> int:
        """What the journal's events and answers cost on disk: its pages in use and its WAL (the free
        pages it keeps, at most KEEP_FREE_BYTES past a settle's step, come on top: new rows fill them first)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0] - self._free_pages()
        try:
            wal = os.stat(self._wal).st_size
        except FileNotFoundError:
            wal = 0
        return pages * self._page_size + wal

    @property
    def _wal(self) -> Path:
        assert self._reserve is not None
        return self._reserve.path.with_name(self._name + "-wal")

    def _default_budget(self) -> int:
        """Half of the filesystem's free space now, the journal's own files counted as free."""
        assert self._reserve is not None
        own = sum(f.stat().st_size for f in (self._reserve.path.with_name(self._name), self._wal) if f.exists())
        return (shutil.disk_usage(self._reserve.path.parent).free + own) // 2

    def _over_budget(self, incoming: int) -> bool:
        """Whether `incoming` more payload bytes would take the journal past its budget (under the
        lock); an inbox without events always takes them, so one larger than the budget is not stuck."""
        if self.max_bytes is None:
            return False
        on_disk = self._on_disk()
        self._at_budget = (on_disk + incoming > self.max_bytes
                           and self._db.execute("SELECT EXISTS (SELECT 1 FROM inbox)").fetchone()[0])
        if self._at_budget and (skipped := self._budget_reached.due()) is not None:
            log.warning("%s: %d MiB on disk, at its budget of %d MiB (journal_max_bytes): new events wait "
                        "unacknowledged until answers make room (%d times since the last line)",
                        self._name, on_disk >> 20, self.max_bytes >> 20, skipped)
        return self._at_budget

    @property
    def taking(self) -> bool:
        """Whether new events may come: not while the disk is full or the journal is at its budget."""
        return self._problem is None and not self._at_budget

    # -- how far the journal has come: a sidecar that must never go backwards --------------------
    def _sequences(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT name, seq FROM sqlite_sequence").fetchall())

    def _never_go_back(self, recorded: dict[str, int]) -> None:
        """Catch a journal emptied, deleted or replaced by an older copy; keep ids growing anyway."""
        now = self._sequences()
        behind = {t: recorded[t] for t in ("inbox", "outbox") if now.get(t, 0) < recorded.get(t, 0)}
        if not behind:
            return
        lost = (f"{recorded.get('pending', 0)} unanswered events and {recorded.get('unsent', 0)} undelivered "
                f"answers journaled before")
        if self.damage is None:
            self.damage = (f"{self._name} went back (event {now.get('inbox', 0)}, journal had reached "
                           f"{recorded.get('inbox', 0)}): {lost} are lost")
        else:  # a damaged file: its events are in the copy moved aside, not replayed
            self.damage += f"; {lost} are in it, not replayed"
        # Consumers drop results by event id: a fresh journal must not hand out old ids again.
        self._db.execute("BEGIN IMMEDIATE")
        for table, seq in behind.items():
            self._db.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
            self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, seq))
        self._db.execute("COMMIT")

    def _record(self) -> None:
        """Write the sidecar (under the lock or before the journal is shared); best effort."""
        if self._mark is None:
            return
        mark = {**self._sequences(),
                "pending": self._db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0],
                "unsent": self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]}
        if mark == self._last_mark:
            return
        with contextlib.suppress(OSError):  # a full disk: the previous mark stays, still a true lower bound
            write_atomic(self._mark, json.dumps(mark).encode())
            self._last_mark = mark

    # -- a full disk --------------------------------------------------------------------------------
    @property
    def problem(self) -> str | None:
        """Why the journal refuses new events now (the disk is full), or None."""
        return self._problem

    def _full(self, why: str) -> DiskFull:
        if self._problem is None:
            self._problem = f"{self._name}: disk full, refusing new events ({why})"
            log.error(self._problem)
        return DiskFull(self._problem)

    def _space_returned(self) -> bool:
        """Resume after a full disk once the reserve is held again and as much is free for events, in
        the journal's free pages or on the disk (under the lock)."""
        assert self._reserve is not None
        room = self._reusable()
        if not self._reserve.restore(room) or shutil.disk_usage(self._reserve.path.parent).free + room < self._reserve.size:
            return False
        log.info("%s: space returned, taking new events again", self._name)
        self._problem = None
        return True

    def _failed(self, exc: sqlite3.Error) -> StorageError:
        error = storage_error(self._name, exc)
        return self._full("a write failed") if isinstance(error, DiskFull) else error

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
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back already (a full disk)
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise self._failed(exc) from None

    def append_many(self, items: list[tuple[str, bytes, float]] | list[tuple[str, bytes, float, int]]
                    | list[tuple[str, bytes, float, int, Priority | None]]) -> list[Event]:
        """Commit received events (topic, payload, received_ms[, dropped[, priority]]) in one
        transaction; raises DiskFull, with nothing written, while the disk is full. `dropped`: the
        payload bytes not kept (an oversized payload is journaled as its head only); `priority`: the
        class of the broker session it came on (None: every function it triggers)."""
        with self._lock:
            if self._problem is not None and not self._space_returned():
                raise DiskFull(self._problem)  # what little space there is stays for settling
            if self._over_budget(sum(len(item[1]) for item in items)):
                raise JournalFull(f"{self._name}: at its budget of {self.max_bytes} bytes on disk")
        events = []
        with self._transaction() as db:
            for topic, payload, received_ms, *rest in items:
                dropped = rest[0] if rest else 0
                priority = rest[1] if len(rest) > 1 else None
                cur = db.execute("INSERT INTO inbox (topic, payload, received_ms, dropped, priority) VALUES (?, ?, ?, ?, ?)",
                                 (topic, payload, received_ms, dropped, priority))
                events.append(Event(str(cur.lastrowid), topic, payload, received_ms, dropped=dropped, priority=priority))
        return events

    def settle(self, answered: Iterable[str], undelivered: list[tuple[str, Message]],
               delivered: Iterable[int] = ()) -> list[int]:
        """In one transaction: forget the answered events, keep their undelivered outputs (event id,
        message) in the outbox, and forget outbox rows since delivered. Returns the new rows' ids.
        On a full disk the reserve is given back for it, so that the journal can still shrink."""
        done = [(int(e),) for e in answered]
        gone = [(int(o),) for o in delivered]
        try:
            ids = self._settle(done, undelivered, gone)
        except DiskFull:
            if self._reserve is None or not self._reserve.release():
                raise
            log.warning("%s: gave back the %d KiB reserve to settle on a full disk", self._name, self._reserve.size >> 10)
            ids = self._settle(done, undelivered, gone)
            with self._lock, contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the next settle reuses the WAL's space
        self._after_settle()
        return ids

    def _after_settle(self) -> None:
        """Deleted rows' pages go back to the disk, a step at a time; the budget may have room again."""
        if self._reserve is None:
            return
        with self._lock:
            self._give_back(VACUUM_STEP_PAGES)
            if self._at_budget:
                self._over_budget(0)

    def _settle(self, done: list[tuple[int]], undelivered: list[tuple[str, Message]],
                gone: list[tuple[int]]) -> list[int]:
        ids = []
        with self._transaction() as db:
            for event_id, message in undelivered:
                cur = db.execute("INSERT INTO outbox (event, topic, payload, qos, retain, properties) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 (event_id, message.topic, message.payload, message.qos, message.retain,
                                  json.dumps(message.properties) if message.properties else "[]"))
                ids.append(cur.lastrowid)
            db.executemany("DELETE FROM inbox WHERE seq = ?", done)
            db.executemany("DELETE FROM outbox WHERE seq = ?", gone)
        return ids

    def checkpoint(self) -> None:
        """Housekeeping, every few seconds: give free pages back (when the journal is empty, all of
        them, and cut the WAL to nothing); resume after a full disk once space has returned; record
        how far the sequence has come. A full disk is reported by `problem`, not raised."""
        if self._reserve is None:
            return
        with self._lock:
            if self._closed:
                return
            try:
                idle = not self._db.execute("SELECT EXISTS (SELECT 1 FROM inbox) OR EXISTS (SELECT 1 FROM outbox)"
                                            ).fetchone()[0]
                if idle and self._problem is None:  # on a full disk the WAL keeps its space for settling
                    self._db.executescript("PRAGMA incremental_vacuum")  # execute() would free one page per call
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                else:
                    self._give_back(VACUUM_STEP_PAGES)
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the file shrinks by what was given back
            except sqlite3.OperationalError as exc:
                error = self._failed(exc)
                if not isinstance(error, DiskFull):
                    raise error from None
            if self._problem is not None:
                self._space_returned()
            if self._at_budget:
                self._over_budget(0)
            self._record()

    def pending(self) -> list[Event]:
        """Events not yet answered, in arrival order (after a restart: to run again)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload, received_ms, dropped, priority FROM inbox "
                                    "ORDER BY seq").fetchall()
        return [Event(str(seq), topic, bytes(payload), received_ms, replayed=True, dropped=dropped, priority=priority)
                for seq, topic, payload, received_ms, dropped, priority in rows]

    def heads(self) -> list[tuple[Event, int]]:
        """Events not yet answered, in arrival order, without their payloads (event, payload size):
        what a restart routes; the payloads are read as the functions have room (`events`)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, length(payload), received_ms, priority FROM inbox "
                                    "ORDER BY seq").fetchall()
        return [(Event(str(seq), topic, b"", received_ms, replayed=True, priority=priority), size)
                for seq, topic, size, received_ms, priority in rows]

    def events(self, ids: list[str]) -> list[Event]:
        """The journaled events with these ids, whole, in the order asked (an id no longer there is left out)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT seq, topic, payload, received_ms, dropped, priority FROM inbox "
                                    f"WHERE seq IN ({marks})", [int(i) for i in ids]).fetchall()
        found = {str(seq): Event(str(seq), topic, bytes(payload), received_ms, dropped=dropped, priority=priority)
                 for seq, topic, payload, received_ms, dropped, priority in rows}
        return [found[i] for i in ids if i in found]

    def outbox(self) -> list[tuple[int, str, Message]]:
        """Outputs not yet delivered (row id, event id, message), in the order they were answered."""
        with self._lock:
            rows = self._db.execute("SELECT seq, event, topic, payload, qos, retain, properties FROM outbox "
                                    "ORDER BY seq").fetchall()
        return [(seq, event, Message(topic, bytes(payload), qos, bool(retain), tuple(map(tuple, json.loads(props)))))
                for seq, event, topic, payload, qos, retain, props in rows]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._record()
                self._db.close()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
