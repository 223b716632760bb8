"""Files that a crash leaves whole: the old version or the new one, never a torn one; and SQLite
files that open whole, or are moved aside for inspection while a fresh one takes their place."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgefn.errors import DiskFull, StorageError

TMP_SUFFIX = ".tmp"  # what an interrupted write_atomic leaves behind (a crash, a full disk)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove what interrupted writes left in `folder` (a kill or a full disk mid-write); a write
    of a process still running is left alone. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f"*{TMP_SUFFIX}"):
        # write_atomic names it .<name>.<pid>.<random>.tmp: the pid is the second dotted part from the end
        # (the name itself may hold digits, e.g. a version).
        owner = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 2)
        pid = int(owner[-2]) if len(owner) == 3 and owner[-2].isdigit() else None
        if pid is not None and pid > 1 and pid != os.getpid() and _running(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# SQLite's primary result codes (fixed by SQLite; Python names them from 3.11 on): a damaged file,
# a full disk, a file that is not a database.
SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 11, 13, 26
_DAMAGED = {SQLITE_NOTADB, SQLITE_CORRUPT}
# Python 3.10 (JetPack 6's) gives no code with the error, only SQLite's text for it (sqlite3_errstr).
_CODE_OF_TEXT = {"database disk image is malformed": SQLITE_CORRUPT, "database or disk is full": SQLITE_FULL,
                 "file is not a database": SQLITE_NOTADB}


def result_code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of `exc`; 0 when it cannot be told."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF
    return _CODE_OF_TEXT.get(str(exc).strip().lower(), 0)


def storage_error(path: Path | str, exc: sqlite3.Error) -> StorageError:
    """The edgefn error for an SQLite failure on `path`: DiskFull for lack of space."""
    if result_code(exc) == SQLITE_FULL:
        return DiskFull(f"{Path(path).name}: disk full")
    return StorageError(f"{Path(path).name}: {exc}")


def open_sqlite(path: Path | str, setup: Callable[[sqlite3.Connection], None]) -> tuple[sqlite3.Connection, str | None]:
    """Open or create the SQLite file at `path` (or ":memory:") and run `setup` (pragmas, schema) on it.

    A file that is not a database, is malformed or fails SQLite's quick check is renamed to
    `<name>.damaged-<time>` (with its WAL) and a fresh one is started, so that one damaged file
    does not keep the daemon from starting. Returns the connection and, if a file was moved aside,
    the one line that says so (for the caller to log, with what it knows was lost)."""
    if str(path) == ":memory:":
        return _open_checked(":memory:", setup), None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _open_checked(path, setup), None
    except sqlite3.DatabaseError as exc:
        if result_code(exc) not in _DAMAGED and not isinstance(exc, _QuickCheckFailed):
            raise storage_error(path, exc) from None
        aside = move_aside(path)
        damage = f"{path.name} was damaged ({' '.join(str(exc).split())}); moved aside to {aside.name}, started a fresh one"
    try:
        return _open_checked(path, setup), damage
    except sqlite3.DatabaseError as exc:
        raise storage_error(path, exc) from None


class _QuickCheckFailed(sqlite3.DatabaseError):
    pass


def _open_checked(path: Path | str, setup: Callable[[sqlite3.Connection], None]) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        setup(db)
        # quick_check reads every page once, no index cross-checks: milliseconds for a bounded inbox
        problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            raise _QuickCheckFailed(f"quick check: {problem}")
    except BaseException:
        db.close()
        raise
    return db


def move_aside(path: Path) -> Path:
    """Rename `path` (and its SQLite WAL) to `<name>.damaged-<time>`; its shared-memory index goes."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():  # damaged twice in a second: keep both
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.replace(path, aside)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        os.replace(wal, aside.with_name(aside.name + "-wal"))
    path.with_name(path.name + "-shm").unlink(missing_ok=True)
    return aside


def file_sha256(path: Path) -> str:
    """A file's sha256 (hex), read a chunk at a time (a bundle, a model file, a compiled component)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
