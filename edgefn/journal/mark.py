"""The journal's high-water mark: what was acknowledged, kept apart from the journal so that its loss shows.

A small SQLite file next to the journal (`inbox.mark`, a name `rm inbox.sqlite*` leaves alone) holds
the ids of the events acknowledged and not yet answered (`acked`), of the answers not yet delivered
(`unsent`), the highest id each journal table handed out (`high`; for events, raised as they leave
`acked`: the largest of the two is how far the journal came), and the damage found and not yet
acknowledged by an operator (`damage`). It is written with every group commit, after the journal's
commit and before the PUBACK, and before the journal forgets what a settle answered. So, at every
instant, every event the broker was told is safe is in the mark; the journal may be ahead of the
mark (a crash between the two commits: nothing acknowledged), never rightly behind it. When they
disagree the mark is trusted for what was acknowledged (the journal cannot know what it lost), the
journal for what it holds: an event in the mark and not in the journal is lost.

Same durability as the journal: `synchronous=NORMAL` (a commit is in the kernel: it survives
SIGKILL) or FULL (an fsync per commit: it survives power loss).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from edgefn.errors import StorageError
from edgefn.files import open_sqlite, storage_error

_SCHEMA = """
CREATE TABLE IF NOT EXISTS acked (seq INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS unsent (seq INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS high (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS damage (id INTEGER PRIMARY KEY, at REAL NOT NULL, what TEXT NOT NULL,
                                   acknowledged REAL);
"""

_RAISE_HIGH = "INSERT INTO high (name, seq) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET seq = max(seq, excluded.seq)"


def mark_path(journal: Path) -> Path:
    """Where the mark of the journal at `journal` lives: inbox.sqlite -> inbox.mark."""
    return journal.with_name(journal.stem + ".mark")


def _setup(db: sqlite3.Connection, durability: str) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    db.execute("PRAGMA busy_timeout=10000")  # `edgefn journal ack-damage` writes it while the daemon runs
    db.execute("PRAGMA journal_size_limit=1048576")  # its WAL is cut back to 1 MiB after each checkpoint
    # A checkpoint every 64 pages (256 KiB), not SQLite's 1,000 (4 MiB): on a full disk the mark's WAL
    # must not take the room the journal's reserve keeps for settling.
    db.execute("PRAGMA wal_autocheckpoint=64")
    db.executescript(_SCHEMA)


class Mark:
    """How far the journal came and what it owes; one connection, used under the journal's lock."""

    def __init__(self, path: Path, durability: str = "process"):
        self.path = path
        self.fresh = not path.exists()  # nothing to check the journal against (a first start, an upgrade)
        self._db, self.damage = open_sqlite(path, lambda db: _setup(db, durability))
        self.fresh = self.fresh or self.damage is not None

    def _write(self, *changes: tuple[str, Iterable[tuple]], high: int | None = None, table: str = "inbox") -> None:
        """One transaction: every change (statement, rows), and the highest id of `table` raised to `high`."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, rows in changes:
                self._db.executemany(sql, rows)
            if high is not None:
                self._db.execute(_RAISE_HIGH, (table, high))
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise storage_error(self.path, exc) from None

    def acknowledged(self, seqs: list[int]) -> None:
        """Events just committed to the journal, about to be acknowledged to the broker. On every event's
        path: the highest id is raised when they leave `acked`, not here (that halves the cost, ~25 us)."""
        self._write(("INSERT OR IGNORE INTO acked (seq) VALUES (?)", [(s,) for s in seqs]))

    def answered(self, events: list[tuple[int]], delivered: list[tuple[int]]) -> None:
        """Before the journal forgets them: events answered, outputs delivered."""
        self._write(("DELETE FROM acked WHERE seq = ?", events), ("DELETE FROM unsent WHERE seq = ?", delivered),
                    high=max((s for (s,) in events), default=None))

    def unsent(self, rows: list[int]) -> None:
        """Outputs just put in the journal's outbox."""
        if rows:
            self._write(("INSERT OR IGNORE INTO unsent (seq) VALUES (?)", [(r,) for r in rows]), high=max(rows),
                        table="outbox")

    def owed(self) -> tuple[set[int], set[int], dict[str, int]]:
        """Events acknowledged and not answered, answers not delivered, the highest ids handed out."""
        acked = {s for (s,) in self._db.execute("SELECT seq FROM acked")}
        high = dict(self._db.execute("SELECT name, seq FROM high").fetchall())
        high["inbox"] = max(high.get("inbox", 0), max(acked, default=0))
        return acked, {s for (s,) in self._db.execute("SELECT seq FROM unsent")}, high

    def reset(self, events: Iterable[int], unsent: Iterable[int], high: dict[str, int]) -> None:
        """Make the mark say what the journal holds now (after it was opened and checked)."""
        self._write(("DELETE FROM acked", [()]), ("DELETE FROM unsent", [()]),
                    ("INSERT INTO acked (seq) VALUES (?)", [(s,) for s in events]),
                    ("INSERT INTO unsent (seq) VALUES (?)", [(s,) for s in unsent]),
                    (_RAISE_HIGH, list(high.items())))

    def report(self, what: str) -> None:
        """Keep `what` until an operator acknowledges it (`edgefn journal ack-damage`)."""
        with self._db:
            self._db.execute("INSERT INTO damage (at, what) VALUES (?, ?)", (time.time(), what))

    def unacknowledged(self) -> list[str]:
        return [what for (what,) in self._db.execute("SELECT what FROM damage WHERE acknowledged IS NULL "
                                                     "ORDER BY id")]

    def close(self) -> None:
        self._db.close()


def acknowledge_damage(journal: Path) -> list[str]:
    """Mark the damage reported of the journal at `journal` as seen by an operator; what it was.
    A running daemon reads the mark at each /healthz: it is ok again at once."""
    path = mark_path(journal)
    if not path.exists():
        raise StorageError(f"no journal mark at {path} (is this the daemon's --state-dir?)")
    try:
        db = sqlite3.connect(str(path), isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("BEGIN IMMEDIATE")
            seen = [what for (what,) in db.execute("SELECT what FROM damage WHERE acknowledged IS NULL ORDER BY id")]
            db.execute("UPDATE damage SET acknowledged = ? WHERE acknowledged IS NULL", (time.time(),))
            db.execute("COMMIT")
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise storage_error(path, exc) from None
    return seen
