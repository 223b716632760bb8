"""The device's audit log, `<state_dir>/fleet/audit.jsonl`: every activation, rollback and refused release,
one JSON object a line, appended and fsync'd before the agent goes on, so that what the device did survives
a crash or a power cut. Nothing here rewrites or truncates it.

    {"at": 1764460800.123, "event": "activated", "bundle": "digits", "version": "1.4.0", "rollout": 3, ...}

events: activated (a release swapped in), rolled-back (back to the previous release, or to the local
functions, with the reason; `by` says whether the device or the fleet decided), refused (a release not
installed: a bad signature, an older version, a broken bundle, ...).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("edgefn.fleet")
AUDIT_FILE = "audit.jsonl"


class DeviceAudit:
    """Appends entries to one audit log; `entries()` reads them back (a line torn by a crash is skipped)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, event: str, **fields: Any) -> None:
        """Write one entry and fsync it; a failure (a full disk) is logged, never raised: the update goes on."""
        line = json.dumps({"at": round(time.time(), 3), "event": event, **fields}, sort_keys=True) + "\n"
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.error("audit log %s: cannot append %s: %s", self.path, event, exc)

    def entries(self) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash mid-write
        return found
