"""The durable journal: events survive a reopen until answered, undelivered outputs until acknowledged."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgefn.events import Message
from edgefn.journal.inbox import Inbox


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
    from edgefn.config import Settings

    monkeypatch.setenv("EDGEFN_DURABILITY", "full")
    durability = Settings().durability
    with Inbox(tmp_path / "inbox.sqlite", durability=durability) as inbox:
        assert inbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with Inbox(tmp_path / "inbox.sqlite") as inbox:
        assert inbox._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
