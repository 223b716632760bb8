"""The router: which functions an event triggers (their topic filters), and into which of each
function's lanes it goes (the planner's hand-off decision).

Routing an event and swapping in a release exclude each other (`swap`): an event goes wholly to
the old release's functions or wholly to the new's.

Priorities. Each priority class of filters is subscribed on a broker session of its own (see
mqtt/connection.py), so an event whose topic triggers functions at two priorities comes in twice:
each copy goes only to the functions that take its topic at the priority of the session it came
on, and so each function gets it once. (A function's priority for a topic is the highest of its
matching filters, and that filter is subscribed on that priority's session.)

A trigger `$share/GROUP/FILTER` (a shared subscription) is subscribed to as written and matches
topics by FILTER (`edgefn.topics.matches_any`): the broker hands each event on FILTER to one member
of GROUP, with its own topic. An event that no function takes at all is handed to `unrouted`
(dispatch/unrouted.py): answered on edgefn/errors/unrouted, never dropped without a word.

The journal's bound is shared (`journal`): each function's budget in the journal (dispatch/share.py)
is `JOURNAL_PART` of the inbox's bound, in events and in bytes, times its manifest's `journal_weight`
over the weights of all the functions routed to; set again when a release is swapped in. An event
past its function's budget is handed to `shed` (dispatch/overflow.py), after routing, outside the lock.
A function alone has no budget: it is in no other's way, and past the inbox's bound ingress holds its
events unacknowledged (the broker keeps them) rather than shed them.
The parts add up to less than the bound (a quarter of it, less the high-priority headroom, is left for
events several functions take and for those in flight), so one function's flood never reaches the
bound, and intake never holds the others' events behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edgefn.dispatch.lanes import Lane, LoadedFunction
from edgefn.events import PRIORITIES, Event, Priority
from edgefn.journal.outbox import Pending
from edgefn.topics import matches_any

_ROUTE_CACHE_MAX = 10_000  # distinct topics remembered; a sensor fleet with more starts the cache afresh
JOURNAL_PART = 0.75  # of the inbox's bound, shared between the functions by weight
UNBOUNDED = 1 << 62
Shed = Callable[[Event, Pending, LoadedFunction], None]


class Router:
    def __init__(self, functions: list[LoadedFunction], under_pressure: Callable[[], bool],
                 done: Callable[[Pending], None], unrouted: Callable[[Event, Pending], None],
                 shed: Shed | None = None, journal: tuple[int, int] | None = None):
        """`journal`: the inbox's bound (events, payload bytes) the functions' budgets share; None: no budgets."""
        self.functions = functions
        self._under_pressure = under_pressure
        self._done = done  # a copy whose functions take it on another session: nothing to answer
        self._unrouted = unrouted  # an event no function takes at all: answered on edgefn/errors/unrouted
        self._shed = shed  # an event past its function's budget in the journal: answered with reason shed
        self._journal = journal
        self._cache: dict[tuple[str, Priority | None], list[LoadedFunction]] = {}
        self._lock = threading.Lock()
        self._share_journal()

    def _share_journal(self) -> None:
        """Each function's budget in the journal: its weighted part of the inbox's bound."""
        if self._journal is None or self._shed is None:
            return
        max_events, max_bytes = self._journal
        if len(self.functions) == 1:  # a lone function is in nobody's way: past the inbox's bound ingress holds
            self.functions[0].share.budget(UNBOUNDED, UNBOUNDED)  # (unacknowledged), as for all, rather than shed
            return
        weights = sum(fn.manifest.limits.journal_weight for fn in self.functions)
        for fn in self.functions:
            part = JOURNAL_PART * fn.manifest.limits.journal_weight / weights
            fn.share.budget(max(1, int(max_events * part)), max(1, int(max_bytes * part)))

    def filters(self) -> dict[Priority, list[str]]:
        """The topic filters to subscribe to for the functions routed to now, by priority class
        (only the classes some function uses)."""
        found: dict[Priority, set[str]] = {}
        for f in self.functions:
            for priority, filters in f.manifest.trigger.filters_by_priority().items():
                found.setdefault(priority, set()).update(filters)
        return {p: sorted(found[p]) for p in PRIORITIES if p in found}

    def lanes(self) -> list[Lane]:
        return [lane for fn in self.functions for lane in fn.lanes.values()]

    def route(self, topic: str, priority: Priority | None = None) -> list[LoadedFunction]:
        """The functions `topic` triggers; with `priority` (the session it came on), only those that
        take it at that priority."""
        hit = self._cache.get((topic, priority))
        if hit is None:
            hit = [f for f in self.functions if matches_any(topic, f.manifest.trigger.topics)
                   and (priority is None or f.priority_of(topic) == priority)]
            if len(self._cache) > _ROUTE_CACHE_MAX:
                self._cache.clear()
            self._cache[(topic, priority)] = hit
        return hit

    def deliver(self, events: list[Event]) -> None:
        """Hand journaled events to each function they trigger: into a lane, or parked past its share, or
        shed past its budget in the journal."""
        nowhere: list[tuple[Event, Pending, bool]] = []
        shed: list[tuple[Event, Pending, LoadedFunction]] = []
        with self._lock:
            pressure = self._under_pressure()
            for event in events:
                routes = self.route(event.topic, event.priority)
                if not routes:
                    nowhere.append((event, Pending.of(event, 1), self._taken_elsewhere(event)))
                    continue
                pending = Pending.of(event, len(routes))
                for fn in routes:
                    if not fn.offer(event, pending, pressure):
                        shed.append((event, pending, fn))
        self._nowhere(nowhere)
        for event, pending, fn in shed:  # outside the lock: an answer is published
            self._shed(event, pending, fn)  # type: ignore[misc]  (without it no budget is set: nothing is shed)

    def replay(self, heads: list[tuple[Event, int]]) -> None:
        """Events journaled before a restart (without their payloads: event, size), parked with each
        function they trigger; its workers read them back from disk as they have room."""
        nowhere: list[tuple[Event, Pending, bool]] = []
        with self._lock:
            for event, size in heads:
                routes = self.route(event.topic, event.priority)
                if not routes:
                    nowhere.append((event, Pending.of(event, 1, size), self._taken_elsewhere(event)))
                    continue
                pending = Pending.of(event, len(routes), size)
                for fn in routes:  # journaled already: run whatever the budget (it sheds new events meanwhile)
                    with fn.share.lock:
                        fn.share.park(pending)
        self._nowhere(nowhere)

    def _taken_elsewhere(self, event: Event) -> bool:
        """Whether a function takes `event`'s topic at another priority than the session it came on: its
        topic came on that class's session too, and goes to the function there."""
        return event.priority is not None and bool(self.route(event.topic))

    def _nowhere(self, events: list[tuple[Event, Pending, bool]]) -> None:
        """Events that go to no function on the session they came on, outside the lock (an answer is
        published): a copy taken on another session is done; any other went to no function at all."""
        for event, pending, elsewhere in events:
            if elsewhere:
                self._done(pending)
            else:
                self._unrouted(event, pending)

    @contextmanager
    def swap(self) -> Iterator[None]:
        """Hold routing while the caller replaces `functions`; the topic cache starts afresh."""
        with self._lock:
            yield
            self._cache = {}
            self._share_journal()
