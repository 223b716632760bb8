"""Log lines that could repeat on every event or every tick (a full disk, a broker dropping packets),
at most once per interval with a count of what was skipped: a line a minute, not thousands."""

from __future__ import annotations

import threading
import time


class Every:
    """A gate for one kind of line: `if (skipped := gate.due()) is not None: log.warning("... (%d like it
    skipped)", ..., skipped)`."""

    def __init__(self, seconds: float):
        self._seconds = seconds
        self._next = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def due(self) -> int | None:
        """The number of lines skipped since the last one when a line is due now, else None."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._skipped += 1
                return None
            self._next = now + self._seconds
            skipped, self._skipped = self._skipped, 0
            return skipped
