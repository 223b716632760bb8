"""A loaded function and its lanes; draining old lanes when a release is swapped out.

Each function has its own lanes (a queue, the workers that take from it, where their inference
runs), so a slow or hostile function backs up only its own queues, never its neighbours'. The
local lane has as many workers as the function's instances; with a cloud endpoint, a cloud lane
takes what the local one cannot serve within its latency budget (its workers' instances wait for
the cloud's answers, not for the CPU).

Priorities. A lane's queue hands out its most urgent events first (`ClassQueue`), each class in
arrival order, and the hand-off counts only the work queued ahead of an event: so under overload
the low-priority events are the ones that go to the cloud lane. Where the manifest allows it and no
cloud lane takes them, low-priority events past the latency budget are shed: marked, and answered
with reason `shed` (without running) ahead of the rest of the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edgefn.dispatch.order import InOrder
from edgefn.dispatch.share import Share
from edgefn.events import PRIORITIES, Event, Priority
from edgefn.functions.manifest import Manifest
from edgefn.functions.sandbox import FunctionSandbox
from edgefn.journal.outbox import Pending
from edgefn.observe.window import HealthWindow
from edgefn.offload.planner import Planner, Where

log = logging.getLogger("edgefn.dispatch")

Item = tuple[Event, Pending, int]  # an event, its pending entry, its ticket in the lane's order
ReadEvents = Callable[[list[str]], list[Event]]  # whole events from the journal, by id (Inbox.events)


SHED = "shed"  # the line of shed events: answered first, they cost nothing
_LINES = (SHED, *PRIORITIES)  # the order a lane's queue hands out its events
_PRIORITIES_CACHE_MAX = 10_000  # distinct topics remembered per function


def line_of(event: Event) -> str:
    return SHED if event.shed else (event.priority or "normal")


class ClassQueue(queue.Queue):
    """A lane's queue: shed events first, then high, normal and low priority ones, each line in
    arrival order; a `None` (stop) only once every event is out."""

    def _init(self, maxsize: int) -> None:
        self._lines: dict[str, deque] = {line: deque() for line in _LINES}
        self._stops: deque[None] = deque()

    def _qsize(self) -> int:
        return sum(map(len, self._lines.values())) + len(self._stops)

    def _put(self, item: Item | None) -> None:
        if item is None:
            self._stops.append(item)
        else:
            self._lines[line_of(item[0])].append(item)

    def _get(self) -> Item | None:
        for line in self._lines.values():
            if line:
                return line.popleft()
        return self._stops.popleft()

    @property
    def queue(self) -> list[Item]:  # type: ignore[override]
        """What is queued, in the order it will be taken (a copy)."""
        with self.mutex:
            return [item for line in self._lines.values() for item in line]

    def ahead(self, priority: Priority) -> int:
        """Events queued that would run before a new one of `priority` (shed ones cost nothing)."""
        with self.mutex:
            return sum(len(self._lines[p]) for p in PRIORITIES[:PRIORITIES.index(priority) + 1])


@dataclass
class Lane:
    """A queue of a function's events, the workers that take from it, and where their inference runs.
    Answers leave a lane in the order its events came in. A `None` in the queue stops its workers."""

    where: Where
    workers: int
    queue: ClassQueue = field(default_factory=ClassQueue)
    order: InOrder = field(default_factory=InOrder)

    def put(self, event: Event, pending: Pending) -> None:
        self.order.queue(self.queue, (event, pending), line_of(event))


@dataclass
class LoadedFunction:
    """A function, its sandbox, and its own lanes."""

    manifest: Manifest
    sandbox: FunctionSandbox
    properties: list[tuple[str, str]]  # MQTT 5 user properties on every output
    planner: Planner
    lanes: dict[str, Lane]
    window: HealthWindow
    share: Share
    workers: list[threading.Thread] = field(default_factory=list)
    _priorities: dict[str, Priority] = field(default_factory=dict)  # topic -> its priority here

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def local(self) -> Lane:
        return self.lanes["local"]

    def priority_of(self, topic: str) -> Priority:
        found = self._priorities.get(topic)
        if found is None:
            found = self.manifest.trigger.priority_of(topic)
            if len(self._priorities) > _PRIORITIES_CACHE_MAX:
                self._priorities.clear()
            self._priorities[topic] = found
        return found

    def offer(self, event: Event, pending: Pending, under_pressure: bool) -> bool:
        """Into a lane (where the planner says) while the function's share has room; else parked, and
        so is every later event until the parked ones have had their turn (arrival order is kept).
        A high-priority event does not wait behind parked ones while the share's headroom lasts.
        False: past the function's budget in the journal, taken by neither (the caller sheds it)."""
        priority = self.priority_of(event.topic)
        urgent = priority == "high"
        with self.share.lock:
            if self.share.over_budget(pending.size, priority):
                return False
            if (self.share.parked and not urgent) or not self.share.has_room(pending.size, headroom=urgent):
                self.share.park(pending)
            else:
                self._into_lane(event, pending, under_pressure)
        return True

    def refill(self, read: ReadEvents, under_pressure: bool) -> None:
        """Bring parked events back from disk into the lanes, oldest first, as far as the share has room
        (again while every head read was gone from the journal: else nothing would ever call it again)."""
        while self._refill_once(read, under_pressure):
            pass

    def _refill_once(self, read: ReadEvents, under_pressure: bool) -> bool:
        """One round of `refill`; True when it read heads of which none was left to run."""
        with self.share.lock:
            heads: list[Pending] = []
            room = self.share.max_events - self.share.events
            nbytes = self.share.bytes
            while self.share.parked and len(heads) < room:
                size = self.share.parked[0].size
                if heads or self.share.events:  # an empty share takes one event whatever its size
                    if nbytes + size > self.share.max_bytes:
                        break
                heads.append(self.share.unpark())
                nbytes += size
            if not heads:
                return False
            events = {e.id: e for e in read([p.event_id for p in heads])}
            taken = 0
            for pending in heads:
                event = events.get(pending.event_id)
                if event is None:  # not in the journal (a replay raced a settle): nothing left to do
                    continue
                self._into_lane(replace(event, replayed=pending.replayed), pending, under_pressure)
                taken += 1
            return taken == 0 and bool(self.share.parked)

    def _into_lane(self, event: Event, pending: Pending, under_pressure: bool) -> None:
        priority = self.priority_of(event.topic)
        cloud = self.lanes.get("cloud")
        ahead = self.local.queue.ahead(priority)  # what runs here before it: the more urgent, and its own class
        where = self.planner.admit(ahead, under_pressure, cloud.queue.qsize() if cloud is not None else 0)
        shed = (priority == "low" and cloud is None and self.manifest.trigger.shed
                and (under_pressure or self.planner.overloaded(ahead)))
        self.share.took(pending.size)
        self.lanes.get(where, self.local).put(replace(event, priority=priority, shed=shed), pending)


def busy(functions: list[LoadedFunction]) -> bool:
    """Whether any of these functions still holds an event not finished (in a lane or parked on disk)."""
    return any(fn.share.parked or any(lane.queue.unfinished_tasks for lane in fn.lanes.values()) for fn in functions)


def stop_workers(lanes: list[Lane]) -> None:
    for lane in lanes:
        lane.queue.put(None)  # each worker that takes it puts it back for the next


AnswerNothing = Callable[[Pending, LoadedFunction], None]


def retire(old: list[LoadedFunction], new: list[LoadedFunction], drain_timeout: float,
           answer_nothing: AnswerNothing) -> None:
    """Let the old lanes finish what they hold, then stop their workers and close their sandboxes.
    Past the deadline (a function stuck on every event), what is still queued moves to the new
    function of the same name, or is answered with nothing where the new release has none."""
    deadline = time.monotonic() + drain_timeout
    lanes = [(fn, lane) for fn in old for lane in fn.lanes.values()]
    while busy(old):
        if time.monotonic() > deadline:
            log.error("old functions still busy after %.0f s: their queued events go to the new ones", drain_timeout)
            hand_over(old, {fn.name: fn for fn in new}, answer_nothing)
            break
        time.sleep(0.01)
    stop_workers([lane for _, lane in lanes])
    for fn in old:
        for thread in fn.workers:
            thread.join()  # a call in a sandbox ends within the function's timeout_ms
        fn.sandbox.close()


def hand_over(old: list[LoadedFunction], new: dict[str, LoadedFunction], answer_nothing: AnswerNothing) -> None:
    """Move what the old functions still hold (queued in their lanes, then parked) to the parked events
    of the new function of the same name, in arrival order; an event whose function the new release
    lacks is answered with nothing."""
    for fn in old:
        held: list[Pending] = []
        for lane in fn.lanes.values():
            while True:
                try:
                    item = lane.queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    event, pending, ticket = item
                    lane.order.release(ticket)  # its place in the old order: given up, nothing published
                    held.append(pending)
                lane.queue.task_done()
        with fn.share.lock:
            held += fn.share.unpark_all()
        held.sort(key=lambda pending: int(pending.event_id))  # journal ids follow arrival order
        successor = new.get(fn.name)
        if successor is not None:
            with successor.share.lock:
                for pending in held:
                    successor.share.park(pending)
        else:
            for pending in held:
                answer_nothing(pending, fn)
