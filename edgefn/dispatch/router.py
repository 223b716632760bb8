"""The router: which functions an event triggers (their topic filters), and into which of each
function's lanes it goes (the planner's hand-off decision).

Routing an event and swapping in a release exclude each other (`swap`): an event goes wholly to
the old release's functions or wholly to the new's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edgefn.dispatch.lanes import Lane, LoadedFunction
from edgefn.events import Event
from edgefn.journal.outbox import Pending
from edgefn.topics import matches_any

_ROUTE_CACHE_MAX = 10_000  # distinct topics remembered; a sensor fleet with more starts the cache afresh


class Router:
    def __init__(self, functions: list[LoadedFunction], under_pressure: Callable[[], bool],
                 unrouted: Callable[[Pending], None]):
        self.functions = functions
        self._under_pressure = under_pressure
        self._unrouted = unrouted  # an event no function takes: answered at once
        self._cache: dict[str, list[LoadedFunction]] = {}
        self._lock = threading.Lock()

    def filters(self) -> list[str]:
        """The topic filters to subscribe to for the functions routed to now."""
        return sorted({t for f in self.functions for t in f.manifest.trigger.topics})

    def lanes(self) -> list[Lane]:
        return [lane for fn in self.functions for lane in fn.lanes.values()]

    def route(self, topic: str) -> list[LoadedFunction]:
        hit = self._cache.get(topic)
        if hit is None:
            hit = [f for f in self.functions if matches_any(topic, f.manifest.trigger.topics)]
            if len(self._cache) > _ROUTE_CACHE_MAX:
                self._cache.clear()
            self._cache[topic] = hit
        return hit

    def deliver(self, events: list[Event]) -> None:
        """Hand journaled events to each function they trigger: into a lane, or parked past its share."""
        with self._lock:
            pressure = self._under_pressure()
            for event in events:
                routes = self.route(event.topic)
                pending = Pending.of(event, len(routes))
                if not routes:
                    self._unrouted(pending)
                for fn in routes:
                    fn.offer(event, pending, pressure)

    def replay(self, heads: list[tuple[Event, int]]) -> None:
        """Events journaled before a restart (without their payloads: event, size), parked with each
        function they trigger; its workers read them back from disk as they have room."""
        with self._lock:
            for event, size in heads:
                routes = self.route(event.topic)
                pending = Pending.of(event, len(routes), size)
                if not routes:
                    self._unrouted(pending)
                for fn in routes:
                    with fn.share.lock:
                        fn.share.parked.append(pending)

    @contextmanager
    def swap(self) -> Iterator[None]:
        """Hold routing while the caller replaces `functions`; the topic cache starts afresh."""
        with self._lock:
            yield
            self._cache = {}
