"""A function's share of the daemon's memory: the events (and their payload bytes) in its lanes.

Every event is journaled on disk before it is acknowledged; only a bounded number of each
function's events are also held in memory, in its lanes. Past its share, a function's events wait
on disk only (parked: their `Pending`, about 200 bytes each) and are read back in arrival order as its workers free
room. So a flood of one function backs up only that function, and memory stays bounded in bytes
whatever the payloads weigh; the journal's own bound (on disk) is the ingress's business.

High-priority events have a headroom of a quarter more than the share (`HEADROOM`): they do not
wait on disk behind a flood of the same function's other events until that is spent too.
"""

from __future__ import annotations

import threading
from collections import deque

from edgefn.journal.outbox import Pending

HEADROOM = 1.25  # of the share, for high-priority events


class Share:
    """The in-memory share of one function, and the events parked past it (guarded by `lock`)."""

    def __init__(self, max_events: int, max_bytes: int):
        self.max_events, self.max_bytes = max_events, max_bytes
        self.lock = threading.Lock()
        self.events = 0
        self.bytes = 0
        self.parked: deque[Pending] = deque()  # in arrival order; the events themselves on disk

    def has_room(self, size: int, headroom: bool = False) -> bool:
        """Room for one more event of `size` bytes (an empty share always has room: no event is too big);
        `headroom`: counting the headroom of high-priority events."""
        if self.events == 0:
            return True
        scale = HEADROOM if headroom else 1.0
        return self.events < self.max_events * scale and self.bytes + size <= self.max_bytes * scale

    def took(self, size: int) -> None:
        self.events += 1
        self.bytes += size

    def freed(self, events: int, size: int) -> None:
        with self.lock:
            self.events -= events
            self.bytes -= size
