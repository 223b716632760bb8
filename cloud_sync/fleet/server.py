"""The fleet server in one piece: its database, TUF repository, rollout engine and HTTP API (with the OIP
endpoint too when models are given), served from a thread of this process (`start_fleet_server`: tests,
benchmarks) or in the foreground (`edgefn cloud serve --data DIR`, through `FleetService.app`)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI

from cloud_sync.fleet.api import fleet_router
from cloud_sync.fleet.db import Database, database_url
from cloud_sync.fleet.engine import RolloutEngine
from cloud_sync.fleet.repository import TufRepository
from cloud_sync.serve import OipEndpoint, ThreadServer, _listen, create_app
from edgefn.errors import ConfigError, EdgefnError


class FleetService:
    """The fleet's parts over a data folder, and the app that serves them; `close()` releases them."""

    def __init__(self, data_dir: Path, *, db_url: str | None = None, models: Sequence[Path] = (),
                 fleet_root: Path | None = None, token: str | None = None, delay_ms: float = 0.0,
                 auth: tuple[str, str] | None = None):
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--data {data_dir}: cannot make the folder ({exc.strerror or exc})") from None
        self.db = Database(database_url(data_dir, db_url))
        self.endpoint: OipEndpoint | None = None
        try:
            self.repository = TufRepository(data_dir / "tuf", trusted_root=fleet_root)
            self.engine = RolloutEngine(self.db)
            if models:  # the OIP endpoint's options: see OipEndpoint
                self.endpoint = OipEndpoint.from_folders(list(models), delay_ms=delay_ms, auth=auth)
        except EdgefnError:
            self.db.close()
            raise
        self.app: FastAPI = create_app(self.endpoint)
        self.app.include_router(fleet_router(self.engine, self.repository, self.db, token=token))

    def close(self) -> None:
        self.engine.stop()
        if self.endpoint is not None:
            self.endpoint.close()
        self.db.close()


class FleetServer(ThreadServer):
    """A fleet server serving from a thread of this process: `.url`, `.engine` (`step(now)` moves rollouts on
    at once), `close()` stops it (idempotent)."""

    def __init__(self, service: FleetService, sock: socket.socket, *, step_s: float):
        self.service, self.engine = service, service.engine
        super().__init__(service.app, sock, "fleet-server")
        if step_s > 0:
            self.engine.start(step_s)

    def __repr__(self) -> str:
        return f"FleetServer(url={self.url!r})"

    def _release(self) -> None:
        self.service.close()


def start_fleet_server(data_dir: Path, *, db_url: str | None = None, models: Sequence[Path] = (),
                       host: str = "127.0.0.1", port: int = 0, step_s: float = 0.5, fleet_root: Path | None = None,
                       token: str | None = None) -> FleetServer:
    """Serve the fleet (state in `data_dir`, or the database at `db_url`) from a thread of this process; the
    engine steps every `step_s` seconds (0: only when `server.engine.step()` is called)."""
    service = FleetService(data_dir, db_url=db_url, models=models, fleet_root=fleet_root, token=token)
    try:
        sock = _listen(host, port)
    except EdgefnError:
        service.close()
        raise
    return FleetServer(service, sock, step_s=step_s)
