"""The fleet server in one piece: its database, TUF repository, rollout engine and HTTP API (with the OIP
endpoint too when models are given), served from a thread of this process (`start_fleet_server`: tests,
benchmarks) or in the foreground (`edgefn cloud serve --data DIR`, through `FleetService.app`)."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from cloud_sync.fleet.api import fleet_router
from cloud_sync.fleet.audit import AuditMiddleware, AuditTrail
from cloud_sync.fleet.db import Database, database_url
from cloud_sync.fleet.engine import RolloutEngine
from cloud_sync.fleet.repository import TufRepository
from cloud_sync.limits import BodyLimits, RouteLimit
from cloud_sync.serve import OipEndpoint, ThreadServer, Tls, _listen, create_app
from edgefn.errors import ConfigError, EdgefnError
from edgefn.protocol.fleet import API

log = logging.getLogger("cloud_sync.fleet")
KIB, MIB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class FleetLimits:
    """The largest body each kind of request may have."""

    report_bytes: int = 64 * KIB  # a device's report (a few hundred bytes in practice)
    request_bytes: int = 64 * KIB  # enrollments, rollout changes
    bundle_bytes: int = 1024 * MIB  # a published bundle; its metadata may add up to 16 MiB

    def routes(self) -> list[RouteLimit]:
        return [RouteLimit(re.compile(re.escape(API) + r"/devices/[^/]*/report$"), self.report_bytes),
                RouteLimit(re.compile(re.escape(API) + r"/publish$"), self.bundle_bytes + 16 * MIB),
                RouteLimit(re.compile(re.escape(API) + r"/"), self.request_bytes)]


class FleetService:
    """The fleet's parts over a data folder, and the app that serves them; `close()` releases them.

    Closed by default: it needs the operator's `token`, and each device its own credential (enrolled with
    that token). `insecure=True` serves anyone who asks, for a lab. The TUF root is pinned at the first
    start (`fleet_root`) and kept in the data folder."""

    def __init__(self, data_dir: Path, *, db_url: str | None = None, models: Sequence[Path] = (),
                 fleet_root: Path | None = None, token: str | None = None, insecure: bool = False,
                 limits: FleetLimits = FleetLimits(), delay_ms: float = 0.0, auth: tuple[str, str] | None = None):
        if token is None and not insecure:
            raise ConfigError("the fleet server needs the operator's credential: --token-file FILE (the "
                              "operator.token of `edgefn fleet keys init`) or --token-env NAME; --insecure serves "
                              "anyone who asks")
        if insecure:
            log.warning("INSECURE fleet server: %s may publish, enroll, change rollouts and report as any device "
                        "(--insecure)", "anyone" if token is None else "only the operator")
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--data {data_dir}: cannot make the folder ({exc.strerror or exc})") from None
        self.db = Database(database_url(data_dir, db_url))
        self.endpoint: OipEndpoint | None = None
        try:
            self.repository = TufRepository(data_dir / "tuf", trusted_root=fleet_root)
            if not self.repository.trusts_a_root:
                raise ConfigError(f"--data {data_dir}: no trusted root yet: give --fleet-root (the operator's "
                                  "1.root.json from `edgefn fleet keys init`) at the first start")
            self.engine = RolloutEngine(self.db, closed=not insecure)
            if models:  # the OIP endpoint's options: see OipEndpoint
                self.endpoint = OipEndpoint.from_folders(list(models), delay_ms=delay_ms, auth=auth)
        except EdgefnError:
            self.db.close()
            raise
        self.app: FastAPI = create_app(self.endpoint)
        self.audit = AuditTrail(self.db)
        self.app.include_router(fleet_router(self.engine, self.repository, self.db, self.audit, token=token))
        self.app.add_middleware(BodyLimits, limits=limits.routes())
        self.app.add_middleware(AuditMiddleware, trail=self.audit, token=token)  # outermost: 413s are recorded too

    def close(self) -> None:
        self.engine.stop()
        if self.endpoint is not None:
            self.endpoint.close()
        self.db.close()


class FleetServer(ThreadServer):
    """A fleet server serving from a thread of this process: `.url`, `.engine` (`step(now)` moves rollouts on
    at once), `close()` stops it (idempotent)."""

    def __init__(self, service: FleetService, sock: socket.socket, *, step_s: float, tls: Tls | None = None):
        self.service, self.engine = service, service.engine
        super().__init__(service.app, sock, "fleet-server", tls)
        if step_s > 0:
            self.engine.start(step_s)

    def __repr__(self) -> str:
        return f"FleetServer(url={self.url!r})"

    def _release(self) -> None:
        self.service.close()


def start_fleet_server(data_dir: Path, *, db_url: str | None = None, models: Sequence[Path] = (),
                       host: str = "127.0.0.1", port: int = 0, step_s: float = 0.5, fleet_root: Path | None = None,
                       token: str | None = None, insecure: bool = False, limits: FleetLimits = FleetLimits(),
                       tls: Tls | None = None) -> FleetServer:
    """Serve the fleet (state in `data_dir`, or the database at `db_url`) from a thread of this process; the
    engine steps every `step_s` seconds (0: only when `server.engine.step()` is called). See FleetService."""
    service = FleetService(data_dir, db_url=db_url, models=models, fleet_root=fleet_root, token=token,
                           insecure=insecure, limits=limits)
    try:
        sock = _listen(host, port)
    except EdgefnError:
        service.close()
        raise
    try:
        return FleetServer(service, sock, step_s=step_s, tls=tls)
    except EdgefnError:
        service.close()
        raise
