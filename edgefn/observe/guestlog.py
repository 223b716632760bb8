"""A function's log, bounded: a guest that calls `host.log` in a loop must not fill the device's disk
nor drown the daemon's own lines (one event wrote 32 MB in half a second before this).

Each function writes through its logger `edgefn.fn.<name>` at most `lines_per_s` lines and
`bytes_per_s` bytes (UTF-8) a second, with a burst of one second's worth: two token buckets. A line is
cut at `MAX_CHARS` characters first. What is over the bound is dropped and counted, in
`edgefn_guest_log_dropped_lines_total{function}` and `..._bytes_total`, and in one line a minute per
function on `edgefn.sandbox`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgefn.observe.metrics import Metrics

MAX_CHARS = 4096  # of one line; the rest is cut
LINES_PER_S = 100  # defaults of the manifest's [limits] log_lines_per_s and log_bytes_per_s
BYTES_PER_S = 64 * 1024
REPORT_EVERY_S = 60.0
LEVELS = (10, 20, 30, 40, 50)  # debug .. critical; a guest's other levels log as info

log = logging.getLogger("edgefn.sandbox")


class GuestLog:
    """The bounded log of one function, shared by its instances (worker threads)."""

    def __init__(self, function: str, lines_per_s: int = LINES_PER_S, bytes_per_s: int = BYTES_PER_S,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic):
        self.function, self.lines_per_s, self.bytes_per_s = function, lines_per_s, bytes_per_s
        self._log = logging.getLogger(f"edgefn.fn.{function}")
        self._metrics, self._clock = metrics, clock
        self._lock = threading.Lock()
        self._lines, self._bytes = float(lines_per_s), float(bytes_per_s)  # tokens: a full second's burst
        self._filled_at = clock()
        self._report_at = 0.0  # the first line dropped is said at once, then a line a minute
        self._unsaid = [0, 0]  # lines and bytes dropped since the last report
        self.dropped_lines = self.dropped_bytes = 0

    def write(self, level: int, message: str) -> None:
        message = message[:MAX_CHARS]
        size = len(message.encode(errors="replace"))
        report = None
        with self._lock:
            now = self._clock()
            passed, self._filled_at = now - self._filled_at, now
            self._lines = min(self.lines_per_s, self._lines + passed * self.lines_per_s)
            self._bytes = min(self.bytes_per_s, self._bytes + passed * self.bytes_per_s)
            allowed = self._lines >= 1 and self._bytes >= size
            if allowed:
                self._lines -= 1
                self._bytes -= size
            else:
                report = self._dropped(size, now)
        if allowed:
            self._log.log(level if level in LEVELS else 20, "%s", message)
            return
        if self._metrics is not None:
            self._metrics.guest_log_dropped_lines.labels(self.function).inc()
            self._metrics.guest_log_dropped_bytes.labels(self.function).inc(size)
        if report is not None:
            log.warning("%s: its log is over its bound (%d lines, %d bytes a second): dropped %d of its lines "
                        "(%d bytes) since the last such line", self.function, self.lines_per_s, self.bytes_per_s,
                        *report)

    def _dropped(self, size: int, now: float) -> tuple[int, int] | None:
        """Count one line dropped (under the lock); what to report when a report is due, else None."""
        self.dropped_lines += 1
        self.dropped_bytes += size
        self._unsaid[0] += 1
        self._unsaid[1] += size
        if now < self._report_at:
            return None
        self._report_at = now + REPORT_EVERY_S
        said, self._unsaid = (self._unsaid[0], self._unsaid[1]), [0, 0]
        return said
