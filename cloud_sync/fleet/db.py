"""The fleet server's state in SQLAlchemy 2: SQLite by default, PostgreSQL by URL, the same tables on both.

    devices       one row per device, as it last reported (registers on its first report)
    bundles       the releases published (their TUF target, sha256 and size)
    rollouts      a release rolled out to a group: its waves (JSON), gate and state
    assignments   what a device of a started wave is to run, and what it ran before (for a roll back)
    groups        the release a group has once a rollout of it is done (devices that join later get it)
    enrollments   the devices the operator enrolled: their group and the sha256 of their credential
    audit         every operator action, appended: who, when, what, its arguments and its result; the
                  database itself refuses to change or delete an entry (triggers on both dialects)

Every change runs in one transaction (`Database.transaction`). SQLite takes its write lock at the start of
each transaction (BEGIN IMMEDIATE), with WAL so reads go on meanwhile and a busy timeout so writers wait
for each other instead of failing: the API's threads and the rollout engine share the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from edgefn.errors import ConfigError, FleetError

BUSY_TIMEOUT_S = 30.0
GROUP_LOCKS = 0x6564  # the advisory lock space of the groups' rollout changes ("ed")
ID = String(128)


class Base(DeclarativeBase):
    pass


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    group: Mapped[str] = mapped_column("group_name", String(128), index=True)
    state: Mapped[str] = mapped_column(String(32))
    bundle: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(64))
    rollout: Mapped[int | None] = mapped_column(Integer)
    target_version: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(2000), default="")
    events: Mapped[int] = mapped_column(Integer, default=0)  # counted over the rollout: base + what it reports
    errors: Mapped[int] = mapped_column(Integer, default=0)
    # A device's counters only grow within a rollout; when they go down (it restarted), what it counted
    # before is kept as a base, and the reset is counted.
    events_base: Mapped[int] = mapped_column(BigInteger, default=0)
    errors_base: Mapped[int] = mapped_column(BigInteger, default=0)
    resets: Mapped[int] = mapped_column(BigInteger, default=0)
    p99_ms: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)  # of its labelled health samples, as it measured them
    agent: Mapped[str] = mapped_column(String(128), default="")
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # function -> FunctionUsage, as last reported
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class BundleRow(Base):
    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    published: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bundle: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    group: Mapped[str] = mapped_column("group_name", String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    # [{"name", "devices", "state", "healthy", "gate_values", "soak_started", "started"}]: a wave's devices are
    # fixed when the rollout is made, and the whole list is read and written with the rollout.
    waves: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    gate: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    soak_s: Mapped[float] = mapped_column(Float)
    wave_timeout_s: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(2000), default="")
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class AssignmentRow(Base):
    """A device of a started wave: the rollout's release is its desired state, or, once the rollout halted
    (rolled_back), the release it ran before (previous_*; None: nothing from the fleet)."""

    __tablename__ = "assignments"

    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    rollout: Mapped[int] = mapped_column(Integer, index=True)
    group: Mapped[str] = mapped_column("group_name", String(128), index=True)
    previous_bundle: Mapped[str | None] = mapped_column(String(128))
    previous_version: Mapped[str | None] = mapped_column(String(64))
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False)


class GroupRow(Base):
    """The release of a group: set by the last rollout of it that was done."""

    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    rollout: Mapped[int] = mapped_column(Integer)


class EnrollmentRow(Base):
    """A device the operator enrolled: only it may report under its id (closed servers)."""

    __tablename__ = "enrollments"

    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    group: Mapped[str] = mapped_column("group_name", String(128), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    enrolled: Mapped[float] = mapped_column(Float)


class AuditRow(Base):
    """One operator action, as it was asked and answered. Append-only: see `_APPEND_ONLY`."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)  # unix seconds
    who: Mapped[str] = mapped_column(String(128))  # the credential's identity; "anonymous" on an open server
    action: Mapped[str] = mapped_column(String(64))  # publish, rollout.create, rollout.pause, device.remove, ...
    arguments: Mapped[dict[str, Any]] = mapped_column(JSON)  # secrets redacted
    status: Mapped[int] = mapped_column(Integer)  # the HTTP status answered (401, 403, 409, ...: refused)
    result: Mapped[str] = mapped_column(String(2000))  # what it did, or why it was refused


# Columns added to a table after its first release: ALTERed into a database made before them.
_ADDED = {"devices": {"events_base": "BIGINT NOT NULL DEFAULT 0", "errors_base": "BIGINT NOT NULL DEFAULT 0",
                     "resets": "BIGINT NOT NULL DEFAULT 0", "accuracy": "FLOAT", "usage": "JSON"}}

# The audit table refuses UPDATE and DELETE (and, on PostgreSQL, TRUNCATE) whoever asks: the API has no route
# that changes an entry, and a bug of ours or a stray statement cannot either.
_APPEND_ONLY = {
    "sqlite": [
        "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit "
        "BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END",
        "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit "
        "BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END",
    ],
    "postgresql": [
        "SELECT pg_advisory_xact_lock(25956, 1)",  # replicas starting together: one makes the triggers
        "CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'audit entries are append-only'; END $$",
        "DROP TRIGGER IF EXISTS audit_no_change ON audit",
        "CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit "
        "FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
        "DROP TRIGGER IF EXISTS audit_no_truncate ON audit",
        "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()",
    ],
}


def _upgrade(engine: Engine) -> None:
    """Add the columns a database made by an older server lacks (create_all makes missing tables only), and
    make the audit table append-only."""
    with engine.begin() as connection:
        found = inspect(connection)
        for table, columns in _ADDED.items():
            have = {c["name"] for c in found.get_columns(table)}
            for column, kind in columns.items():
                if column not in have:
                    connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
        for statement in _APPEND_ONLY[engine.dialect.name]:
            connection.execute(text(statement))


def database_url(data_dir: Path, url: str | None) -> str:
    """The SQLAlchemy URL: `url` as given (postgresql:// meaning psycopg 3), else SQLite in the data folder."""
    if url is None:
        return f"sqlite:///{data_dir / 'fleet.sqlite'}"
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare):]
    return url


class Database:
    """The engine and sessions of one fleet database; the tables are made if missing."""

    def __init__(self, url: str):
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ConfigError(f"--db {url!r} is not a database URL (e.g. postgresql://user@host/fleet)") from None
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ConfigError(f"--db {parsed.render_as_string()}: the fleet server keeps its state in SQLite or "
                              "PostgreSQL")
        self.engine = _sqlite_engine(url) if self.dialect == "sqlite" else create_engine(
            url, pool_size=8, max_overflow=8, pool_pre_ping=True)
        try:
            Base.metadata.create_all(self.engine)
            _upgrade(self.engine)
        except OperationalError as exc:
            self.engine.dispose()
            raise FleetError(f"cannot open the fleet database {parsed.render_as_string()}: {exc.orig}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back if it raises."""
        with self._sessions() as session, session.begin():
            yield session

    def lock_group(self, session: Session, group: str) -> None:
        """Hold the group against other servers until the transaction ends (PostgreSQL: an advisory lock on a
        hash of its name; SQLite's write lock, taken at BEGIN, holds the whole database already)."""
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:group))"),
                            {"space": GROUP_LOCKS, "group": group})

    def insert(self, table: Any) -> Any:
        """The dialect's INSERT, which has `on_conflict_do_update` (an upsert) on both."""
        return (sqlite.insert if self.dialect == "sqlite" else postgresql.insert)(table)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling is turned off so that BEGIN IMMEDIATE below is what starts one:
        # a deferred transaction that reads and then writes can fail at once with "database is locked".
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
