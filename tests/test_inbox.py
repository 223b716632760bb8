"""The durable journal: events survive a reopen until answered, undelivered outputs until acknowledged."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path

import pytest

from edgefn.errors import DiskFull, JournalFull
from edgefn.events import Message
from edgefn.journal.inbox import _SCHEMA, Inbox
from edgefn.journal.mark import acknowledge_damage, mark_path
from tests.conftest import fill


def test_inbox_keeps_pending_events_across_reopen(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    with Inbox(path) as inbox:
        a = inbox.append("sensors/a/x", b"one")
        b = inbox.append("sensors/b/x", b"\x00two")
        c = inbox.append("sensors/c/x", b"")
        inbox.settle([b.id], [])
        assert len(inbox) == 2
    with Inbox(path) as inbox:
        pending = inbox.pending()
        assert [(e.id, e.topic, e.payload) for e in pending] == [(a.id, "sensors/a/x", b"one"), (c.id, "sensors/c/x", b"")]
        assert len(inbox) == 2
        assert pending[0].received_ms == a.received_ms


def test_inbox_ids_are_never_reused(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    with Inbox(path) as inbox:
        first = inbox.append("t", b"x")
        inbox.settle([first.id], [])
    with Inbox(path) as inbox:
        assert int(inbox.append("t", b"y").id) > int(first.id)


def test_inbox_done_with_nothing_is_a_no_op_and_close_is_idempotent(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.settle([], [])
    assert len(inbox) == 0
    inbox.close()
    inbox.close()


def test_settle_moves_undelivered_outputs_to_the_outbox_atomically(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    with Inbox(path) as inbox:
        a, b = inbox.append("sensors/a/x", b"one"), inbox.append("sensors/b/x", b"two")
        rows = inbox.settle([a.id], [(a.id, Message("results/a", b"r1")), (a.id, Message("edgefn/errors/f", b"e"))])
        assert len(rows) == 2
        inbox.settle([], [], delivered=[rows[1]])
    with Inbox(path) as inbox:  # what a restart sees: one output to send again, one event to run again
        assert inbox.outbox() == [(rows[0], a.id, Message("results/a", b"r1"))]
        assert [(e.id, e.replayed) for e in inbox.pending()] == [(b.id, True)]


def test_settle_that_fails_changes_nothing(tmp_path: Path):
    with Inbox(tmp_path / "inbox.sqlite") as inbox:
        a = inbox.append("sensors/a/x", b"one")
        unstorable = Message("results/a", object())  # fails on the second insert, after the first
        with pytest.raises(sqlite3.Error):
            inbox.settle([a.id], [(a.id, Message("results/a", b"r1")), (a.id, unstorable)])
        assert len(inbox) == 1 and inbox.outbox() == []


def test_inbox_durability_full_syncs_every_commit(tmp_path: Path, monkeypatch):
    from edgefn.config import load_settings

    monkeypatch.setenv("EDGEFN_DURABILITY", "full")
    durability = load_settings().durability
    with Inbox(tmp_path / "inbox.sqlite", durability=durability) as inbox:
        assert inbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with Inbox(tmp_path / "inbox.sqlite") as inbox:
        assert inbox._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


# --- a full disk ------------------------------------------------------------------------------------


def test_full_disk_refuses_new_events_whole_and_still_settles(small_disk: Path, caplog: pytest.LogCaptureFixture):
    inbox = Inbox(small_disk / "inbox.sqlite", reserve_bytes=512 * 1024)
    try:
        events = inbox.append_many([("sensors/a/x", os.urandom(1000), 0.0) for _ in range(300)])
        filler = fill(small_disk)
        with pytest.raises(DiskFull, match="disk full"):
            inbox.append_many([("sensors/a/x", os.urandom(1000), 0.0) for _ in range(50)])
        assert len(inbox) == 300  # nothing half-written
        assert "disk full" in (inbox.problem or "")
        inbox.settle([e.id for e in events[:250]], [(events[0].id, Message("results/a", b"r"))])  # the reserve pays
        assert len(inbox) == 50 and len(inbox.outbox()) == 1
        with pytest.raises(DiskFull):  # what the reserve gave back stays for settling
            inbox.append("sensors/a/x", b"new")
        inbox.checkpoint()
        assert inbox.problem is not None

        filler.unlink()
        inbox.checkpoint()
        assert inbox.problem is None
        assert int(inbox.append("sensors/a/x", b"new").id) > int(events[-1].id)
        assert (small_disk / "inbox.sqlite.reserve").stat().st_size == 512 * 1024
    finally:
        inbox.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info  # one line, not a traceback per try


def _empty_wal(db: Path) -> None:
    """Cut the WAL of the SQLite file at `db` to nothing (from another connection): its next write must grow it."""
    with contextlib.closing(sqlite3.connect(db)) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_a_journal_closed_on_a_full_disk_counts_no_answered_event_lost_at_the_next_start(
        small_disk: Path, caplog: pytest.LogCaptureFixture):
    """A settle on a full disk whose write of the mark fails: the journal forgets the answered events, and
    the mark must too, or the next start says they were lost (it did: 250 events "lost", all answered)."""
    path = small_disk / "inbox.sqlite"
    inbox = Inbox(path, reserve_bytes=512 * 1024)
    try:
        events = inbox.append_many([("sensors/a/x", os.urandom(1000), 0.0) for _ in range(300)])
        _empty_wal(mark_path(path))
        filler = fill(small_disk)
        inbox.settle([e.id for e in events[:250]], [])  # the reserve pays
        assert len(inbox) == 50 and inbox.problem is not None
    finally:
        inbox.close()  # stopped on the full disk, before space returned
    filler.unlink()
    with Inbox(path, reserve_bytes=512 * 1024) as again:
        assert again.damage is None
        assert [e.id for e in again.pending()] == [e.id for e in events[250:]]
    assert not [r for r in caplog.records if "lost" in r.getMessage()]


def test_a_mark_out_of_step_on_a_full_disk_is_set_from_the_journal_at_close(small_disk: Path,
                                                                            caplog: pytest.LogCaptureFixture):
    """The reserve already given back, a settle goes on though its write of the mark fails (the disk needs
    the room it frees); at close, on a disk full again, the mark is set from the journal in the room that
    the journal's WAL leaves as it closes."""
    path = small_disk / "inbox.sqlite"
    inbox = Inbox(path, reserve_bytes=1024 * 1024)
    try:
        events = inbox.append_many([("sensors/a/x", os.urandom(1000), 0.0) for _ in range(300)])
        _empty_wal(mark_path(path))
        fill(small_disk)
        inbox.settle([e.id for e in events[:100]], [])  # the reserve pays
        assert not path.with_name("inbox.sqlite.reserve").exists()
        inbox.checkpoint()  # the journal's WAL is copied back: the next settle writes over it, in its own room
        _empty_wal(mark_path(path))
        fill(small_disk)  # and what the checkpoint gave back taken too
        inbox.settle([e.id for e in events[100:250]], [])
        assert len(inbox) == 50
        filler = fill(small_disk)  # and what that settle gave back
    finally:
        inbox.close()
    filler.unlink()
    with Inbox(path, reserve_bytes=1024 * 1024) as again:
        assert again.damage is None
        assert [e.id for e in again.pending()] == [e.id for e in events[250:]]
    assert not [r for r in caplog.records if "lost" in r.getMessage()]


def test_full_disk_at_open_refuses_events_until_space_returns(small_disk: Path):
    filler = fill(small_disk)
    filler_size = filler.stat().st_size
    os.truncate(filler, filler_size - 256 * 1024)  # room for the journal's files, not for its reserve
    with Inbox(small_disk / "inbox.sqlite", reserve_bytes=512 * 1024) as inbox:
        assert "disk full" in (inbox.problem or "")
        with pytest.raises(DiskFull):
            inbox.append("sensors/a/x", b"x")
        filler.unlink()
        inbox.append("sensors/a/x", b"x")
        assert inbox.problem is None


def test_checkpoint_shrinks_an_empty_journal(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    with Inbox(path) as inbox:
        events = inbox.append_many([("sensors/a/x", os.urandom(1000), 0.0) for _ in range(2000)])
        inbox.checkpoint()  # not empty: the WAL is copied back, the file keeps its events
        full_size = path.stat().st_size
        assert full_size > 2_000_000
        inbox.settle([e.id for e in events], [])
        inbox.checkpoint()
        assert path.with_name("inbox.sqlite-wal").stat().st_size == 0
        assert path.stat().st_size < full_size // 10


def test_settles_give_a_bloated_journals_pages_back_while_it_runs(tmp_path: Path):
    """A flood leaves free pages behind as it is answered: they go back to the disk, not only once empty."""
    path = tmp_path / "inbox.sqlite"
    with Inbox(path) as inbox:
        payloads = [os.urandom(100_000) for _ in range(300)]
        events = inbox.append_many([("sensors/a/x", p, 0.0) for p in payloads])
        inbox.checkpoint()
        bloated = path.stat().st_size
        assert bloated > 30_000_000
        for i in range(0, 290, 10):  # as the daemon settles: a few answered events at a time
            inbox.settle([e.id for e in events[i:i + 10]], [])
        inbox.checkpoint()
        assert path.stat().st_size < bloated // 3  # 10 events left, and a few MiB of free pages for the next ones
        assert [e.payload for e in inbox.pending()] == payloads[290:]  # the pages moved, the rows whole


def _old_journal(path: Path, auto_vacuum: str) -> None:
    """A journal as an older edgefn (or an interrupted flood) left it: 30 MB of pages, one event in use."""
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA auto_vacuum={auto_vacuum}")
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        db.executemany("INSERT INTO inbox (topic, payload, received_ms) VALUES (?, ?, 0)",
                       [("sensors/a/x", os.urandom(100_000)) for _ in range(300)])
        db.execute("DELETE FROM inbox WHERE seq < 300")
    db.close()


@pytest.mark.parametrize("auto_vacuum", ["NONE", "INCREMENTAL"])
def test_a_bloated_journal_shrinks_at_start(tmp_path: Path, auto_vacuum: str):
    path = tmp_path / "inbox.sqlite"
    _old_journal(path, auto_vacuum)
    assert path.stat().st_size > 30_000_000
    with Inbox(path) as inbox:
        assert path.stat().st_size < 1_000_000 and path.with_name("inbox.sqlite-wal").stat().st_size == 0
        assert inbox._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL: it shrinks as it runs from now on
        [event] = inbox.pending()
        assert event.id == "300" and len(event.payload) == 100_000


def test_the_journals_free_pages_count_as_room_on_a_full_disk(small_disk: Path):
    """The journal filled the disk itself: once it drains, it takes events again though the disk
    has less free than its reserve asks (the room is in its own free pages)."""
    path = small_disk / "inbox.sqlite"
    inbox = Inbox(path, reserve_bytes=512 * 1024, max_bytes=1 << 40)  # no budget: the disk itself fills
    try:
        events = []
        with contextlib.suppress(DiskFull):
            for _ in range(100):  # a 4 MiB disk: full long before
                events += inbox.append_many([("sensors/a/x", os.urandom(50_000), 0.0) for _ in range(5)])
                inbox.checkpoint()  # as the daemon does every few seconds: the WAL goes into the file
        assert inbox.problem is not None
        for i in range(0, len(events) - 1, 4):  # as the daemon settles, a few at a time; the reserve pays the first
            inbox.settle([e.id for e in events[i:min(i + 4, len(events) - 1)]], [])
        inbox.checkpoint()
        assert inbox.problem is None and inbox.taking
        inbox.append("sensors/a/x", os.urandom(50_000))
    finally:
        inbox.close()


def test_the_byte_budget_refuses_events_whole_until_answers_make_room(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    with Inbox(path, max_bytes=8 * 1024 * 1024) as inbox:
        events = []
        with pytest.raises(JournalFull, match="budget"):
            for _ in range(100):  # 30 MB at most
                events += inbox.append_many([("sensors/a/x", os.urandom(100_000), 0.0) for _ in range(3)])
        assert not inbox.taking and inbox.problem is None  # held back, not a fault
        on_disk = path.stat().st_size + path.with_name("inbox.sqlite-wal").stat().st_size
        assert on_disk < 8 * 1024 * 1024 + 4 * 1024 * 1024  # the budget, and free pages it kept for reuse
        assert len(inbox) == len(events) > 30
        inbox.settle([e.id for e in events[:10]], [])
        assert inbox.taking
        inbox.append("sensors/a/x", os.urandom(100_000))



def test_group_commits_far_from_the_budget_measure_the_disk_only_after_a_settle(tmp_path: Path):
    """Asking SQLite for its page counts and stat()ing the WAL at every group commit was a cost of each
    event's intake: far from the budget, an estimate since the last measurement does; a settle (which
    writes the outbox) has the next commit measure again."""
    with Inbox(tmp_path / "inbox.sqlite", max_bytes=64 * 1024 * 1024) as inbox:
        measured: list[int] = []
        on_disk = inbox._on_disk

        def counted() -> int:
            measured.append(1)
            return on_disk()

        inbox._on_disk = counted  # type: ignore[method-assign]
        events = [e for _ in range(100) for e in inbox.append_many([("sensors/a/x", b"x" * 200, 0.0)] * 10)]
        assert len(measured) == 1
        inbox.settle([e.id for e in events], [])
        inbox.append("sensors/a/x", b"x")
        assert len(measured) == 2
        assert inbox.taking


def test_the_budget_estimate_measures_again_as_it_nears_the_budget(tmp_path: Path):
    """Many small commits (each adds whole pages to the WAL) stop at the budget all the same."""
    path = tmp_path / "inbox.sqlite"
    with Inbox(path, max_bytes=2 * 1024 * 1024) as inbox:
        with pytest.raises(JournalFull, match="budget"):
            for _ in range(20_000):
                inbox.append("sensors/a/x", os.urandom(300))
        on_disk = path.stat().st_size + path.with_name("inbox.sqlite-wal").stat().st_size
        assert on_disk < 2 * 1024 * 1024 + 4 * 1024 * 1024  # the budget, and free pages it kept for reuse


# --- damaged and lost journals ---------------------------------------------------------------------


def _journal_with_200_events(path: Path) -> list[str]:
    with Inbox(path) as inbox:
        return [e.id for e in inbox.append_many([("sensors/a/x", os.urandom(500), 0.0) for _ in range(200)])]


def _garble(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "header":
        data[:100] = os.urandom(100)
    elif how == "middle":
        middle = len(data) // 2
        data[middle:middle + 4096] = os.urandom(4096)
    else:  # truncated
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["header", "middle", "truncated"])
def test_damaged_journal_is_moved_aside_and_a_fresh_one_started(tmp_path: Path, how: str,
                                                                caplog: pytest.LogCaptureFixture):
    path = tmp_path / "inbox.sqlite"
    ids = _journal_with_200_events(path)
    _garble(path, how)
    with Inbox(path) as inbox:
        assert inbox.pending() == []
        assert int(inbox.append("sensors/a/x", b"new").id) > int(ids[-1])  # ids are never reused
        assert "damaged" in (inbox.damage or "") and "200 unanswered events" in inbox.damage
    [aside] = tmp_path.glob("inbox.sqlite.damaged-*")
    assert aside.stat().st_size > 0
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "\n" not in error and aside.name in error


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_journal_that_went_back_is_reported_as_events_lost(tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "inbox.sqlite"
    ids = _journal_with_200_events(path)
    if how == "emptied":
        path.write_bytes(b"")
    else:
        path.unlink()
    with Inbox(path) as inbox:
        damage = inbox.damage
        assert "200 unanswered events" in (damage or "") and "lost" in damage
        assert int(inbox.append("sensors/a/x", b"new").id) > int(ids[-1])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [damage]
    with Inbox(path) as inbox:  # found once (the journal is whole again), said until acknowledged
        assert inbox.damage == damage
        assert acknowledge_damage(path) == [damage]
        assert inbox.damage is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [damage]


def test_whole_journal_reports_no_damage(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    _journal_with_200_events(path)
    with Inbox(path) as inbox:
        assert inbox.damage is None and inbox.problem is None and len(inbox) == 200


def test_outbox_keeps_qos_retain_and_user_properties_across_reopen(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    alert = Message("alerts/a/last", b"hot", qos=1, retain=True, properties=(("severity", "high"), ("zone", "2")))
    fast = Message("results/a", b"r", qos=0)
    with Inbox(path) as inbox:
        a = inbox.append("sensors/a/x", b"one")
        inbox.settle([a.id], [(a.id, alert), (a.id, fast)])
    with Inbox(path) as inbox:
        assert [m for _, _, m in inbox.outbox()] == [alert, fast]


def test_an_outbox_written_before_delivery_options_reads_as_qos1_not_retained(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    with sqlite3.connect(path) as db:  # the tables as an edgefn without QoS, retain and properties made them
        db.executescript("""
            CREATE TABLE inbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                                payload BLOB NOT NULL, received_ms REAL NOT NULL, dropped INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL,
                                 topic TEXT NOT NULL, payload BLOB NOT NULL);
            INSERT INTO outbox (event, topic, payload) VALUES ('7', 'results/a', x'6f6c64');
        """)
    db.close()
    with Inbox(path) as inbox:
        [(_, event, old)] = inbox.outbox()
        assert (event, old) == ("7", Message("results/a", b"old", qos=1, retain=False, properties=()))
        b = inbox.append("sensors/a/x", b"two")
        inbox.settle([b.id], [(b.id, Message("results/a", b"new", qos=0, retain=True, properties=(("k", "v"),)))])
        assert inbox.outbox()[1][2] == Message("results/a", b"new", qos=0, retain=True, properties=(("k", "v"),))


def test_an_inbox_written_before_hop_counts_opens_with_its_events_at_hop_0(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    with sqlite3.connect(path) as db:  # the inbox as an edgefn without hop counts made it, one event pending
        db.executescript("""
            CREATE TABLE inbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
                                received_ms REAL NOT NULL, dropped INTEGER NOT NULL DEFAULT 0, priority TEXT);
            INSERT INTO inbox (topic, payload, received_ms) VALUES ('sensors/a/x', x'6f6c64', 1.0);
        """)
    db.close()
    with Inbox(path) as inbox:
        [old] = inbox.pending()
        assert (old.id, old.payload, old.hop) == ("1", b"old", 0)
        [new] = inbox.append_many([("results/a/x", b"new", 2.0, 0, None, 3)])
        assert new.hop == 3
    with Inbox(path) as inbox:
        assert [e.hop for e in inbox.pending()] == [0, 3]
        assert [e.hop for e, _ in inbox.heads()] == [0, 3]
        assert [e.hop for e in inbox.events(["2"])] == [3]

