"""A function's share of the daemon's memory: the events (and their payload bytes) in its lanes.

Every event is journaled on disk before it is acknowledged; only a bounded number of each
function's events are also held in memory, in its lanes. Past its share, a function's events wait
on disk only (parked: their `Pending`, about 200 bytes each) and are read back in arrival order as its workers free
room. So a flood of one function backs up only that function, and memory stays bounded in bytes
whatever the payloads weigh; the journal's own bound (on disk) is the ingress's business.

High-priority events have a headroom of a quarter more than the share (`HEADROOM`): they do not
wait on disk behind a flood of the same function's other events until that is spent too.

The journal's budget. Parked events still take room in the journal, and the inbox's bound
(`inbox_max_events`, `inbox_max_bytes`) is the whole daemon's: once one function's backlog reached
it, intake held everyone's events and then stopped reading (and a stock broker dropped them). So each
function also has a budget in the journal (`budget`: a part of that bound, weighted per the
manifest's `journal_weight`, set by the router): its events journaled and not yet answered, in its
lanes or parked. Past it, a new event of the function is answered at once with reason `shed`
(dispatch/overflow.py) instead of waiting; low-priority events are shed first, at three quarters of
the budget, and high-priority ones only past the budget and its headroom (`BUDGET_SCALE`).
"""

from __future__ import annotations

import threading
from collections import deque

from edgefn.events import Priority
from edgefn.journal.outbox import Pending

HEADROOM = 1.25  # of the share, for high-priority events
# Of the journal's budget, what each priority may fill: the low-priority events are shed first, leaving
# room for the function's high-priority ones.
BUDGET_SCALE: dict[Priority, float] = {"low": 0.75, "normal": 1.0, "high": HEADROOM}
UNBOUNDED = 1 << 62


class Share:
    """The in-memory share of one function, and the events parked past it (guarded by `lock`)."""

    def __init__(self, max_events: int, max_bytes: int):
        self.max_events, self.max_bytes = max_events, max_bytes
        self.lock = threading.Lock()
        self.events = 0
        self.bytes = 0
        self.parked: deque[Pending] = deque()  # in arrival order; the events themselves on disk
        self.parked_bytes = 0  # their payload bytes
        self.budget_events, self.budget_bytes = UNBOUNDED, UNBOUNDED  # in the journal, lanes and parked together

    def budget(self, max_events: int, max_bytes: int) -> None:
        """The function's budget in the journal: its events (and their payload bytes) journaled and not answered."""
        with self.lock:
            self.budget_events, self.budget_bytes = max_events, max_bytes

    def over_budget(self, size: int, priority: Priority) -> bool:
        """Whether one more event of `size` bytes and `priority` would take the function past its budget in the
        journal (a function with nothing journaled is never past it: no event is too big)."""
        events = self.events + len(self.parked)
        if events == 0:
            return False
        scale = BUDGET_SCALE[priority]
        return (events >= self.budget_events * scale
                or self.bytes + self.parked_bytes + size > self.budget_bytes * scale)

    def park(self, pending: Pending) -> None:
        self.parked.append(pending)
        self.parked_bytes += pending.size

    def unpark(self) -> Pending:
        """The oldest parked event, out of the parked ones."""
        pending = self.parked.popleft()
        self.parked_bytes -= pending.size
        return pending

    def unpark_all(self) -> list[Pending]:
        held, self.parked, self.parked_bytes = list(self.parked), deque(), 0
        return held

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
