"""The health window of the functions running now: events, errors and latency since they were
activated. The fleet agent reports it and holds it against a rollout's gate."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from edgefn.protocol.fleet import MAX_COUNTER, MAX_MS, Health


class HealthWindow:
    """Events, errors and the latest latencies (for a p99), counted from activation on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events = self.errors = 0
        self.accuracy: float | None = None  # measured by the release's health check (labelled samples)
        self._ms: deque[float] = deque(maxlen=4096)  # the latest latencies, for the p99

    def record(self, ok: bool, seconds: float) -> None:
        with self._lock:
            self.events += 1
            self.errors += not ok
            self._ms.append(seconds * 1000)

    def snapshot(self) -> Health:
        with self._lock:
            p99 = float(np.percentile(np.fromiter(self._ms, float), 99)) if self._ms else None
            # Held within what a report may say (the server refuses more): a device up for years saturates.
            return Health(events=min(self.events, MAX_COUNTER), errors=min(self.errors, MAX_COUNTER),
                          p99_ms=None if p99 is None else min(p99, MAX_MS), accuracy=self.accuracy)
