"""systemd's notify protocol (sd_notify(3)), spoken with a plain datagram socket.

Under a `Type=notify` unit, systemd hands the service `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
namespace) and, with `WatchdogSec=`, `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process it is meant for).
The daemon says `READY=1` once it serves, `WATCHDOG=1` at half the watchdog interval while its
housekeeping loop turns (a hung daemon stops saying it, and systemd restarts it), `STOPPING=1` when it
drains. Outside systemd (no `$NOTIFY_SOCKET`) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger("edgefn.service")


class Notifier:
    """The service's messages to systemd; `watchdog_s` is how often to ping (None: no watchdog asked)."""

    def __init__(self, environ: Mapping[str, str] = os.environ):
        address = environ.get("NOTIFY_SOCKET") or None
        # "@name" is an abstract socket (Linux): its name starts with a NUL byte.
        self.address = "\0" + address[1:] if address is not None and address.startswith("@") else address
        self.watchdog_s: float | None = None
        pid = environ.get("WATCHDOG_PID")
        usec = environ.get("WATCHDOG_USEC", "")
        if self.address is not None and usec.isdigit() and int(usec) > 0 and pid in (None, str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6 / 2  # twice per interval, as sd_watchdog_enabled(3) advises
        self._last_ping = 0.0
        self._ready = False  # no ping before READY=1: the watchdog watches a daemon that serves
        self._order = threading.Lock()  # READY=1 is sent before any ping (housekeeping pings from its own thread)
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=VALUE` lines; False where there is no systemd to tell, or it did not go."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: a ping every few seconds must not fill the journal
                log.warning("cannot tell systemd (%s): %s", self.address.lstrip("\0"), exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        with self._order:
            sent = self.send("READY=1", *([f"STATUS={status}"] if status else []))
            self._ready = True
        return sent

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=draining events in hand")

    def watchdog(self) -> bool:
        """WATCHDOG=1 when half the interval has gone by since the last one (and READY=1 was said); call it
        as often as you like."""
        with self._order:
            if not self._ready or self.watchdog_s is None or time.monotonic() - self._last_ping < self.watchdog_s:
                return False
            self._last_ping = time.monotonic()
            return self.send("WATCHDOG=1")
