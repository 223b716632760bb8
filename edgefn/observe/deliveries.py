"""When each trigger filter last had an event delivered: the tell of a subscription the broker granted
and never serves (mosquitto grants a SUBACK for a filter its ACL denies, then drops at delivery)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from edgefn.topics import matches_any

_TOPICS_MAX = 4096  # topics remembered with their filter (device ids make topics many)


class Deliveries:
    """`filters()` reads the trigger filters of the functions running now (a release swap changes them)."""

    def __init__(self, filters: Callable[[], Iterable[str]]):
        self._filters = filters
        self._lock = threading.Lock()
        self._at: dict[str, float] = {}  # filter -> when an event matching it last came (monotonic)
        self._filter_of: dict[str, list[str]] = {}  # topic -> the filters it matches

    def record(self, topics: Iterable[str]) -> None:
        """Events on these topics came now."""
        now = time.monotonic()
        filters: list[str] | None = None  # read once per call, and only when a topic is new
        with self._lock:
            for topic in topics:
                found = self._filter_of.get(topic)
                if found is None:
                    if len(self._filter_of) >= _TOPICS_MAX:
                        self._filter_of.clear()
                    if filters is None:
                        filters = list(self._filters())
                    found = self._filter_of[topic] = [f for f in filters if matches_any(topic, [f])]
                for f in found:
                    self._at[f] = now

    def forget_filters(self) -> None:
        """The triggers changed (a release swapped in): match topics afresh."""
        with self._lock:
            self._filter_of.clear()

    def snapshot(self) -> dict[str, float | None]:
        """For /healthz: each trigger filter's seconds since its last event (None: none since the start)."""
        now = time.monotonic()
        with self._lock:
            return {f: (round(now - self._at[f], 1) if f in self._at else None) for f in sorted(set(self._filters()))}
