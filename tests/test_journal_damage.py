"""Journal damage is seen, counted and said until acknowledged: a journal deleted, cut or replaced by an
older copy after a SIGKILL, counted against its mark; /healthz degraded until `edgefn journal ack-damage`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgefn.journal.inbox import Inbox

# --- a journal that went back after a SIGKILL: counted from the mark written with each commit --------

_KILLED = """
import os, signal, sys
from edgefn.events import Message
from edgefn.journal.inbox import Inbox
path, answer_old, append, answer_new, unsent = sys.argv[1], *map(int, sys.argv[2:])
inbox = Inbox(path)
old = [e.id for e in inbox.pending()]
new = [e.id for n in range(0, append, 50)
       for e in inbox.append_many([("sensors/a/x", b"x" * 100, 0.0)] * min(50, append - n))]
answered = old[:answer_old] + new[:answer_new]
inbox.settle(answered, [(e, Message("results/a", b"r")) for e in answered[:unsent]])
os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: what a crash leaves
"""


def _killed(path: Path, answer_old: int = 0, append: int = 0, answer_new: int = 0, unsent: int = 0) -> None:
    """A process that journals and answers events, then dies by SIGKILL."""
    child = subprocess.run([sys.executable, "-c", _KILLED, str(path), str(answer_old), str(append), str(answer_new),
                            str(unsent)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == -signal.SIGKILL, child.stderr


def _journal_files(path: Path) -> list[Path]:
    return [p for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")) if p.exists()]


def test_old_copy_put_back_after_a_kill_is_counted_lost(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A copy of the journal taken at 100 events put back after 171 more were acknowledged: the mark
    says which were still owed (it said "ok": the sidecar was written only at checkpoints and close)."""
    path, backup = tmp_path / "inbox.sqlite", tmp_path / "backup"
    _killed(path, append=100)
    backup.mkdir()
    for f in _journal_files(path):
        shutil.copy(f, backup / f.name)
    # 30 of the old answered, 171 new, 50 of them answered; 5 answers still wait for the broker.
    _killed(path, answer_old=30, append=171, answer_new=50, unsent=5)
    for f in _journal_files(path):
        f.unlink()
    for f in backup.iterdir():
        shutil.copy(f, tmp_path / f.name)
    with Inbox(path) as inbox:
        damage = inbox.damage or ""
        # Owed at the kill: 70 old (in the copy, replayed) and 121 new (151-271: lost); 5 answers.
        assert "went back (event 100, journal had reached 271)" in damage, damage
        assert "121 unanswered events and 5 undelivered answers" in damage and "lost" in damage
        assert len(inbox.pending()) == 100  # the copy's, the 30 answered since run again
        assert int(inbox.append("sensors/a/x", b"new").id) == 272
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [damage]


@pytest.mark.parametrize("how", ["deleted", "wal-cut", "truncated"])
def test_journal_deleted_after_a_kill_is_counted_lost(tmp_path: Path, how: str):
    """`rm inbox.sqlite*`, a WAL cut to nothing or a file cut in half after a kill with 171 events owed:
    171 lost (it said nothing and started clean, or said the file was damaged and not what it held; after
    a checkpoint had written the sidecar, "0 unanswered events")."""
    path = tmp_path / "inbox.sqlite"
    _killed(path, append=200, answer_new=29)
    if how == "deleted":
        for f in tmp_path.glob("inbox.sqlite*"):
            f.unlink()
    elif how == "wal-cut":
        path.with_name("inbox.sqlite-wal").write_bytes(b"")
    else:
        with contextlib.closing(sqlite3.connect(path)) as db:  # the WAL's pages into the file, then half of it
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with Inbox(path) as inbox:
        damage = inbox.damage or ""
        assert "171 unanswered events and 0 undelivered answers" in damage, damage
        assert ("are in it, not replayed" if how == "truncated" else "are lost") in damage, damage
        assert inbox.pending() == [] and int(inbox.append("sensors/a/x", b"new").id) == 201


def _health(port: int) -> dict:
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())
    except urllib.error.HTTPError as answer:  # 503: degraded or stalled
        return json.loads(answer.read())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefn.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "300"})


def test_healthz_is_degraded_by_journal_damage_until_acknowledged(broker, settings_for, digits_fn, started):
    """A journal deleted after a kill with 25 events owed: /healthz said "ok" (the damage only in
    journal_damage, when it was seen at all); now degraded with the reason until the CLI acknowledges it."""
    settings = settings_for(broker, digits_fn, metrics_port=0)
    journal = settings.state_dir / "inbox.sqlite"
    _killed(journal, append=40, answer_new=15)
    for f in settings.state_dir.glob("inbox.sqlite*"):
        f.unlink()
    d = started(settings)
    health = _health(d.observe.port)
    assert health["status"] == "degraded", health
    assert "25 unanswered events" in health["problem"] and "edgefn journal ack-damage" in health["problem"]
    assert "25 unanswered events" in health["journal_damage"]
    assert _cli("status", "--port", str(d.observe.port)).returncode == 1

    ack = _cli("journal", "ack-damage", "--state-dir", str(settings.state_dir))
    assert ack.returncode == 0 and "acknowledged" in ack.stdout and "25 unanswered events" in ack.stdout, ack.stderr
    health = _health(d.observe.port)
    assert (health["status"], health["problem"], health["journal_damage"]) == ("ok", None, None)
    again = _cli("journal", "ack-damage", "--state-dir", str(settings.state_dir))
    assert again.returncode == 0 and "no journal damage" in again.stdout


def test_ack_damage_has_help_and_says_a_wrong_state_dir_in_one_line(tmp_path: Path):
    assert "--state-dir" in _cli("journal", "ack-damage", "--help").stdout
    wrong = _cli("journal", "ack-damage", "--state-dir", str(tmp_path))
    assert wrong.returncode == 2 and "no journal mark" in wrong.stderr and "Traceback" not in wrong.stderr


def test_damaged_mark_is_said_and_the_journal_goes_on(tmp_path: Path):
    path = tmp_path / "inbox.sqlite"
    _killed(path, append=10)
    (tmp_path / "inbox.mark").write_bytes(b"not a database" * 100)
    for f in tmp_path.glob("inbox.mark-*"):
        f.unlink()
    with Inbox(path) as inbox:
        assert "inbox.mark was damaged" in (inbox.damage or "") and "could not be checked" in inbox.damage
        assert len(inbox.pending()) == 10 and int(inbox.append("sensors/a/x", b"new").id) == 11


_CHURN = """
import random, sys
from edgefn.events import Message
from edgefn.journal.inbox import Inbox
inbox = Inbox(sys.argv[1])
if inbox.damage:
    sys.exit(f"damage: {inbox.damage}")
print("open", flush=True)
rng = random.Random()
while True:  # what the daemon does: group commits, settles answering some and keeping answers, deliveries
    inbox.append_many([("sensors/a/x", b"x" * 100, 0.0)] * rng.randint(1, 5))
    pending = [e.id for e in inbox.pending()]
    answered = rng.sample(pending, len(pending) // 2)
    rows = inbox.settle(answered, [(e, Message("results/a", b"r")) for e in answered[:2]],
                        [r for r, _, _ in inbox.outbox()][:3])
"""


def test_a_journal_killed_at_any_point_reports_no_damage(tmp_path: Path):
    """The mark is written after the journal's commit and before a settle: a SIGKILL between the two
    leaves the journal ahead of the mark, which is no loss (the journal holds it all)."""
    path = tmp_path / "inbox.sqlite"
    rng = random.Random(29)
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", _CHURN, str(path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert child.stdout.readline() == "open\n", child.communicate()[1]
        time.sleep(rng.uniform(0.01, 0.3))
        child.send_signal(signal.SIGKILL)
        child.communicate()
    with Inbox(path) as inbox:
        assert inbox.damage is None and len(inbox.pending()) > 0
