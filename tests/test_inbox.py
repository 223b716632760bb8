"""The durable inbox: what is appended survives a reopen until it is marked done."""

from __future__ import annotations

from pathlib import Path

from edgefn.journal.inbox import Inbox


def test_inbox_keeps_pending_events_across_reopen(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    with Inbox(path) as inbox:
        a = inbox.append("sensors/a/x", b"one")
        b = inbox.append("sensors/b/x", b"\x00two")
        c = inbox.append("sensors/c/x", b"")
        inbox.done([b.id])
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
        inbox.done([first.id])
    with Inbox(path) as inbox:
        assert int(inbox.append("t", b"y").id) > int(first.id)


def test_inbox_done_with_nothing_is_a_no_op_and_close_is_idempotent(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.done([])
    assert len(inbox) == 0
    inbox.close()
    inbox.close()
