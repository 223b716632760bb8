"""A real PostgreSQL for the tests: Debian's server binaries, a cluster in a temporary folder for the session
(unix socket there, TCP on loopback), a fresh database per test. It fails, never skips, when PostgreSQL is
not installed: the fleet server's tests must run on it."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from edgefn.mqtt.local_broker import free_port

_numbers = itertools.count(1)


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql); the fleet server's tests "
                    "run on it as well as on SQLite")
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The server's URL (no database named): postgresql://postgres@127.0.0.1:PORT."""
    bin_dir = _bin_dir()
    # Not under pytest's tmp_path: as root the server runs as the postgres user, which must own the folder.
    base = Path(tempfile.mkdtemp(prefix="edgefn-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=60)
        if done.returncode:
            pytest.fail(f"{Path(args[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    # Durability off: a test database need not survive a crash, and fsyncs are most of its cost.
    options = f"-k {base} -h 127.0.0.1 -p {port} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-o", options, "-w", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A fresh, empty database on the server; its URL."""
    name = f"fleet_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"
