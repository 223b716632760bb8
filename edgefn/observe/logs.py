"""Log lines that could repeat on every event or every tick, rate-limited: the first of a kind is
logged whole (with its traceback, where there is one), later ones at most once per interval with a
count of what was held back. A full disk then costs a line a minute, not thousands of tracebacks."""

from __future__ import annotations

import logging
import threading
import time


class RateLimited:
    """One logger's repeating messages, keyed by kind."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0):
        self._log, self._every = logger, every_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (logged at, held back since)

    def log(self, level: int, kind: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            at, held = self._last.get(kind, (None, 0))
            if at is not None and now - at < self._every:
                self._last[kind] = (at, held + 1)
                return
            self._last[kind] = (now, 0)
        if held:
            msg += f" (and {held} more like it in the last {now - at:.0f} s)"  # type: ignore[operator]
        # The traceback only the first time: the same one again says nothing new.
        self._log.log(level, msg, *args, exc_info=exc_info and at is None)

    def clear(self, kind: str) -> None:
        """The trouble of this kind is over: its next occurrence is logged whole again."""
        with self._lock:
            self._last.pop(kind, None)
