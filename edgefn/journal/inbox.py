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

A full disk. SQLite needs free space to delete: the pages a delete changes go to the WAL first.
With `secure_delete=FAST` that is the b-tree pages only (measured: 144 kB of WAL to forget 154
events of 250 kB; a SQLite built with SECURE_DELETE zeroes every freed page through the WAL, 38 MB,
so a settle on a full disk needed as much room as it would free). A reserve file of `reserve_bytes`
sits next to the journal; when a settle (or its write of the mark) fails for lack of space the
reserve is given back and the settle goes through. Meanwhile new events are refused whole
(`DiskFull`, nothing acknowledged) and `problem` says why; `checkpoint()` re-creates the reserve
and resumes once space has returned. `checkpoint()` also shrinks the files once the journal is
empty (the WAL and the freed pages).

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

A damaged file is moved aside and a fresh journal started. A journal that went back (emptied,
deleted, an old copy restored, its WAL cut) is caught by its mark (`mark.py`), written with every
group commit: the events acknowledged and not answered that the journal no longer holds are lost,
and counted. Either is kept in the mark as `damage` until an operator acknowledges it. Event ids
are never reused, even after a loss.
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from edgefn.errors import DiskFull, JournalFull, StorageError
from edgefn.events import Event, Message, Priority
from edgefn.files import open_sqlite, storage_error
from edgefn.journal.mark import Mark, mark_path
from edgefn.observe.logs import Every

log = logging.getLogger("edgefn.journal")

RESERVE_BYTES = 8 * 1024 * 1024  # room on a full disk for settles (and the mark's writes) until pages go back
WAL_LIMIT_BYTES = 4 * 1024 * 1024  # a WAL larger than this is cut back to it after each checkpoint
KEEP_FREE_BYTES = 4 * 1024 * 1024  # free pages kept for new events to reuse; past this they go back to the disk
VACUUM_STEP_PAGES = 256  # given back after one settle at most (1 MiB of 4 KiB pages): the group commit waits for it
# What one appended event may add on disk besides its payload (its row, the index), how many times it is
# written (the WAL, then the file), and the pages a commit adds to the WAL however small it is: the
# estimate of the journal's growth between measurements errs high.
ROW_BYTES, WRITTEN_TIMES, COMMIT_PAGES = 128, 2, 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_ms REAL NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    priority TEXT,
    hop INTEGER NOT NULL DEFAULT 0
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
    # Where SQLite is built with SECURE_DELETE (Debian's, Ubuntu's), a delete writes zeros over every page it
    # frees, through the WAL: a settle would need as much free disk as the events it forgets (38 MB for 154
    # events of 250 kB, more than the reserve: a full disk stayed full). FAST zeroes only the pages it writes
    # anyway; a payload's freed overflow pages keep their bytes until reused or given back (incremental vacuum).
    db.execute("PRAGMA secure_delete=FAST")
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
    if "hop" not in inbox:  # before hop counts: its events came from sensors, as far as it knew
        db.execute("ALTER TABLE inbox ADD COLUMN hop INTEGER NOT NULL DEFAULT 0")
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


def _read_legacy_mark(mark: Path) -> dict[str, int]:
    """The highest ids an edgefn before `inbox.mark` recorded (`inbox.sqlite.seq`, JSON), to go on from."""
    try:
        return {k: int(v) for k, v in json.loads(mark.read_text()).items() if k in ("inbox", "outbox")}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        log.warning("%s: unreadable (%s); ids go on from the journal's", mark.name, exc)
        return {}


class Inbox:
    """Events received and not yet answered; one writer connection shared under a lock.

    `problem` is set while the journal cannot take new events (the disk is full) and cleared when
    it can again; `damage` says what was found damaged or lost, until an operator acknowledges it;
    `taking` is False while it refuses new events (a full disk, or its byte budget `max_bytes` reached)."""

    def __init__(self, path: Path | str, durability: Literal["process", "full"] = "process",
                 reserve_bytes: int = RESERVE_BYTES, max_bytes: int | None = None):
        self._lock = threading.Lock()
        self._closed = False
        self._problem: str | None = None
        self._name = Path(path).name
        self._reserve: _Reserve | None = None
        self._mark: Mark | None = None
        self._mark_behind = False  # a write of the mark failed: it is set from the journal at the next checkpoint
        self._unsaved_damage: list[str] = []  # damage the mark could not keep (a full disk at start)
        if str(path) != ":memory:":  # ":memory:" keeps nothing across a crash (--journal memory)
            path = Path(path)
            self._mark = Mark(mark_path(path), durability)
            self._reserve = _Reserve(path.with_name(path.name + ".reserve"), reserve_bytes)
        self._db, damaged = open_sqlite(path, lambda db: _setup(db, durability))
        self._page_size: int = self._db.execute("PRAGMA page_size").fetchone()[0]
        self.max_bytes: int | None = None  # the byte budget on disk (None: ":memory:", none)
        self._at_budget = False
        # The bytes on disk as last measured (None: measure at the next group commit) and what was appended
        # since: far from the budget, a group commit need not ask SQLite and stat the WAL.
        self._measured: int | None = None
        self._appended = 0
        self._budget_reached = Every(60.0)
        if self._mark is None or self._reserve is None:
            return
        self._check(damaged, path.with_name(path.name + ".seq"))
        self._shrink_at_start()
        if not self._reserve.restore(self._reusable()):
            self._full(f"the journal keeps {2 * reserve_bytes >> 20} MiB free: its reserve and room for events")
        self.max_bytes = max_bytes if max_bytes is not None else self._default_budget()

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

    def _over_budget(self, incoming: int, rows: int = 0) -> bool:
        """Whether `incoming` more payload bytes (of `rows` events) would take the journal past its budget
        (under the lock); an inbox without events always takes them, so one larger than the budget is not
        stuck. Measured only near the budget: far from it, an estimate since the last measurement says so."""
        if self.max_bytes is None:
            return False
        growth = WRITTEN_TIMES * (incoming + ROW_BYTES * rows) + COMMIT_PAGES * self._page_size
        if self._measured is not None and not self._at_budget and (
                self._measured + self._appended + growth <= self.max_bytes):
            self._appended += growth  # taken (or, if the commit fails, counted all the same: the estimate errs high)
            return False  # under the budget however the appends since the last measurement landed
        on_disk = self._measured = self._on_disk()
        self._appended = growth
        self._at_budget = (on_disk + incoming > self.max_bytes
                           and self._db.execute("SELECT EXISTS (SELECT 1 FROM inbox)").fetchone()[0])
        if self._at_budget and (skipped := self._budget_reached.due()) is not None:
            log.warning("%s: %d MiB on disk, at its budget of %d MiB (journal_max_bytes): new events wait "
                        "unacknowledged until answers make room (%d times since the last line)",
                        self._name, on_disk >> 20, self.max_bytes >> 20, skipped)
        return self._at_budget

    @property
    def holding(self) -> str | None:
        """Why new events wait unacknowledged though the disk has room (the journal is at its byte budget), or None."""
        if not self._at_budget or self.max_bytes is None:
            return None
        return (f"{self._name}: at its budget of {self.max_bytes >> 20} MiB on disk (journal_max_bytes): new events "
                f"are held unacknowledged until answers make room")

    @property
    def taking(self) -> bool:
        """Whether new events may come: not while the disk is full or the journal is at its budget."""
        return self._problem is None and not self._at_budget

    # -- what the journal owes: checked against its mark at each start -----------------------------
    def _sequences(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT name, seq FROM sqlite_sequence").fetchall())

    def _held(self) -> tuple[set[int], set[int]]:
        return ({s for (s,) in self._db.execute("SELECT seq FROM inbox")},
                {s for (s,) in self._db.execute("SELECT seq FROM outbox")})

    def _check(self, damaged: str | None, legacy: Path) -> None:
        """Count what the journal lost against its mark (a damaged file moved aside, a journal emptied,
        deleted, replaced by an older copy); report it; then keep ids growing and the mark in step."""
        assert self._mark is not None
        events, unsent = self._held()
        now = self._sequences()
        fresh = self._mark.fresh  # a first start, an older edgefn's journal, a damaged mark: nothing to compare
        acked, owed, high = (set(), set(), _read_legacy_mark(legacy)) if fresh else self._mark.owed()
        behind = {t: high[t] for t in ("inbox", "outbox") if now.get(t, 0) < high.get(t, 0)}
        lost = (f"{len(acked - events)} unanswered events and {len(owed - unsent)} undelivered answers, "
                f"acknowledged before,")
        if self._mark.damage:
            self._report(f"{self._mark.damage}; the journal could not be checked for loss this time")
        if damaged:  # its events are in the copy moved aside, not replayed
            self._report(damaged if fresh else f"{damaged}; {lost} are in it, not replayed")
        elif not fresh and (behind or acked - events or owed - unsent):
            self._report(f"{self._name} went back (event {now.get('inbox', 0)}, journal had reached "
                         f"{high.get('inbox', 0)}): {lost} are lost")
        if behind:  # consumers drop results by event id: a fresh journal must not hand out old ids again
            self._db.execute("BEGIN IMMEDIATE")
            for table, seq in behind.items():
                self._db.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
                self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, seq))
            self._db.execute("COMMIT")
        self._keep_mark(lambda mark: mark.reset(events, unsent, self._sequences()))
        legacy.unlink(missing_ok=True)

    def _report(self, damage: str) -> None:
        """Say it once, and keep it in the mark until acknowledged (in memory only if the mark cannot take it)."""
        log.error(damage)
        assert self._mark is not None
        try:
            self._mark.report(damage)
        except StorageError as exc:
            self._unsaved_damage.append(f"{damage} (not kept: {exc})")

    @property
    def damage(self) -> str | None:
        """What was found damaged or lost and is not acknowledged yet (`edgefn journal ack-damage`), or None.
        Read from the mark each time: an acknowledgement from another process shows at once."""
        if self._mark is None:
            return None
        with self._lock:
            if self._closed:
                return None
            try:
                found = self._mark.unacknowledged()
            except sqlite3.Error as exc:
                found = [f"{self._mark.path.name}: cannot be read ({exc})"]
        return "; ".join(found + self._unsaved_damage) or None

    def _keep_mark(self, write: Callable[[Mark], None]) -> StorageError | None:
        """Write the mark (under the lock); the error if it failed. A failed write leaves the mark out of
        step with the journal (after a settle: still owing events the journal has answered, a false loss
        at the next start); it is set from the journal at the next checkpoint, and at close."""
        if self._mark is None:
            return None
        try:
            write(self._mark)
        except StorageError as exc:
            if not self._mark_behind:  # a full disk is the journal's problem too, said there as an error
                log.log(logging.WARNING if isinstance(exc, DiskFull) else logging.ERROR,
                        "%s; set from the journal again at the next checkpoint", exc)
            self._mark_behind = True
            return exc
        return None

    def _set_mark_from_journal(self) -> StorageError | None:
        """The mark says what the journal holds now (under the lock, the journal open)."""
        failed = self._keep_mark(lambda mark: mark.reset(*self._held(), self._sequences()))
        if failed is None:
            self._mark_behind = False
        return failed

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
                    | list[tuple[str, bytes, float, int, Priority | None]]
                    | list[tuple[str, bytes, float, int, Priority | None, int]]) -> list[Event]:
        """Commit received events (topic, payload, received_ms[, dropped[, priority[, hop]]]) in one
        transaction; raises DiskFull, with nothing written, while the disk is full. `dropped`: the
        payload bytes not kept (an oversized payload is journaled as its head only); `priority`: the
        class of the broker session it came on (None: every function it triggers); `hop`: its edgefn-hop."""
        with self._lock:
            if self._problem is not None and not self._space_returned():
                raise DiskFull(self._problem)  # what little space there is stays for settling
            incoming = sum(len(item[1]) for item in items)
            if self._over_budget(incoming, len(items)):
                raise JournalFull(f"{self._name}: at its budget of {self.max_bytes} bytes on disk")
        events = []
        with self._transaction() as db:
            for topic, payload, received_ms, *rest in items:
                dropped = rest[0] if rest else 0
                priority = rest[1] if len(rest) > 1 else None
                hop = rest[2] if len(rest) > 2 else 0
                cur = db.execute("INSERT INTO inbox (topic, payload, received_ms, dropped, priority, hop) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (topic, payload, received_ms, dropped, priority, hop))
                events.append(Event(str(cur.lastrowid), topic, payload, received_ms, dropped=dropped, priority=priority,
                                    hop=hop))
        with self._lock:  # after the commit, before the PUBACK: every acknowledged event is in the mark
            self._keep_mark(lambda mark: mark.acknowledged([int(e.id) for e in events]))
        return events

    def settle(self, answered: Iterable[str], undelivered: list[tuple[str, Message]],
               delivered: Iterable[int] = ()) -> list[int]:
        """In one transaction: forget the answered events, keep their undelivered outputs (event id,
        message) in the outbox, and forget outbox rows since delivered. Returns the new rows' ids.
        On a full disk the reserve is given back for it, so that the journal can still shrink."""
        done = [(int(e),) for e in answered]
        gone = [(int(o),) for o in delivered]
        with self._lock:  # before the journal forgets them: a crash between the two loses nothing from sight
            failed = self._keep_mark(lambda mark: mark.answered(done, gone))
        if isinstance(failed, DiskFull) and self._release_reserve():  # else the mark would owe what the journal forgets
            with self._lock:
                self._keep_mark(lambda mark: mark.answered(done, gone))
        try:
            ids = self._settle(done, undelivered, gone)
        except DiskFull:
            if not self._release_reserve():
                raise
            ids = self._settle(done, undelivered, gone)
            with self._lock, contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the next settle reuses the WAL's space
        self._after_settle()
        return ids

    def _release_reserve(self, why: str = "settle") -> bool:
        """Give the reserve back for a write on a full disk; False if none was held. New events are
        refused until it is held again (`_space_returned`): its room stays for settling."""
        if self._reserve is None or not self._reserve.release():
            return False
        self._full(f"its reserve given back to {why}")
        log.warning("%s: gave back the %d KiB reserve to %s on a full disk", self._name, self._reserve.size >> 10, why)
        return True

    def _after_settle(self) -> None:
        """Deleted rows' pages go back to the disk, a step at a time; the budget may have room again."""
        if self._reserve is None:
            return
        with self._lock:
            self._measured = None  # the outbox took rows, the inbox gave some back: measured at the next commit
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
        with self._lock:
            self._keep_mark(lambda mark: mark.unsent(ids))
        return ids

    def checkpoint(self) -> None:
        """Housekeeping, every few seconds: give free pages back (when the journal is empty, all of
        them, and cut the WAL to nothing); resume after a full disk once space has returned; set the
        mark from the journal if a write of it failed. A full disk is reported by `problem`, not raised."""
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
            self._measured = None
            if self._at_budget:
                self._over_budget(0)
            if self._mark_behind:  # on a full disk too: a daemon stopped there must not count answered events lost
                self._set_mark_from_journal()

    def pending(self) -> list[Event]:
        """Events not yet answered, in arrival order (after a restart: to run again)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload, received_ms, dropped, priority, hop FROM inbox "
                                    "ORDER BY seq").fetchall()
        return [Event(str(seq), topic, bytes(payload), received_ms, replayed=True, dropped=dropped, priority=priority,
                      hop=hop)
                for seq, topic, payload, received_ms, dropped, priority, hop in rows]

    def heads(self) -> list[tuple[Event, int]]:
        """Events not yet answered, in arrival order, without their payloads (event, payload size):
        what a restart routes; the payloads are read as the functions have room (`events`)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, length(payload), received_ms, priority, hop FROM inbox "
                                    "ORDER BY seq").fetchall()
        return [(Event(str(seq), topic, b"", received_ms, replayed=True, priority=priority, hop=hop), size)
                for seq, topic, size, received_ms, priority, hop in rows]

    def events(self, ids: list[str]) -> list[Event]:
        """The journaled events with these ids, whole, in the order asked (an id no longer there is left out)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT seq, topic, payload, received_ms, dropped, priority, hop FROM inbox "
                                    f"WHERE seq IN ({marks})", [int(i) for i in ids]).fetchall()
        found = {str(seq): Event(str(seq), topic, bytes(payload), received_ms, dropped=dropped, priority=priority,
                                 hop=hop)
                 for seq, topic, payload, received_ms, dropped, priority, hop in rows}
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
                held = (*self._held(), self._sequences()) if self._mark_behind else None
                self._db.close()  # its WAL is copied back and removed: on a full disk, room for the mark
                if held is not None:
                    self._set_mark_at_close(*held)
                if self._mark is not None:
                    self._mark.close()

    def _set_mark_at_close(self, events: set[int], unsent: set[int], high: dict[str, int]) -> None:
        """Stopped before a checkpoint set the mark (a full disk): set it to what the journal holds, with
        the reserve's room if need be (the next start holds it again where there is room), lest the next
        start count answered events as lost."""
        def reset(mark: Mark) -> None:
            mark.reset(events, unsent, high)

        failed = self._keep_mark(reset)
        if isinstance(failed, DiskFull) and self._release_reserve("set its mark"):
            failed = self._keep_mark(reset)
        if failed is not None:
            log.error("%s: its mark could not be set from the journal (%s); the next start may count answered "
                      "events as lost", self._name, failed)

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
