"""The reorder buffer: a lane's answers leave in the order its events came in, per line.

A line is a priority class (and the shed events' own line): a high-priority event taken ahead of
queued low-priority ones must not wait for their answers, so each class keeps arrival order only
among its own events. Tickets are handed out as events are queued; a worker that finishes releases its ticket with the
function that publishes its answer, and that function runs once every ticket before it has run.
Whichever worker happens to complete the sequence drains it, outside the lock: the lock guards only
the counters, so a publish that blocks (the broker slow to acknowledge) never holds up a worker
queueing or releasing, nor anything the broker's own thread needs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable

log = logging.getLogger("edgefn.dispatch")


def _nothing() -> None:
    pass


class InOrder:
    """One lane's tickets, in lines, and the answers waiting for their turn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued = 0
        self._lines: dict[Hashable, deque[int]] = {}  # per line, its tickets not yet run, in issue order
        self._line_of: dict[int, Hashable] = {}  # tickets issued and not yet run
        self._ready: dict[int, Callable[[], None]] = {}
        self._draining = False  # one thread at a time runs the ready answers, in ticket order

    def queue(self, into: queue.Queue, item: tuple, line: Hashable = "") -> None:
        """Put `item` with the next ticket appended into `into` (under the lock: tickets follow queue order)."""
        with self._lock:
            ticket = self._issued
            into.put((*item, ticket))
            self._issued += 1
            self._line_of[ticket] = line
            self._lines.setdefault(line, deque()).append(ticket)

    @property
    def waiting(self) -> int:
        """Answers released but held back by an earlier ticket."""
        with self._lock:
            return len(self._ready)

    def release(self, ticket: int, publish: Callable[[], None] = _nothing) -> None:
        """Run `publish` when every ticket before this one in its line has run; each ticket at most
        once. Releasing with nothing to publish gives the ticket's place up."""
        with self._lock:
            if ticket not in self._line_of or ticket in self._ready:
                return
            self._ready[ticket] = publish
            if self._draining:
                return  # the thread draining now runs it in its turn
            self._draining = True
        self._drain()

    def _next_ready(self) -> Callable[[], None] | None:
        for tickets in self._lines.values():
            if tickets and tickets[0] in self._ready:
                ticket = tickets.popleft()
                del self._line_of[ticket]
                return self._ready.pop(ticket)
        return None

    def _drain(self) -> None:
        while True:
            with self._lock:
                publish = self._next_ready()
                if publish is None:
                    self._draining = False
                    return
            try:
                publish()
            except Exception:  # a bug of ours must not stall the function's later answers
                log.exception("publishing an answer failed")
