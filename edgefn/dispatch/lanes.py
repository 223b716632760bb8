"""A loaded function and its lanes; draining old lanes when a release is swapped out.

Each function has its own lanes (a queue, the workers that take from it, where their inference
runs), so a slow or hostile function backs up only its own queues, never its neighbours'. The
local lane has as many workers as the function's instances; with a cloud endpoint, a cloud lane
takes what the local one cannot serve within its latency budget (its workers' instances wait for
the cloud's answers, not for the CPU).
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
from edgefn.events import Event
from edgefn.functions.manifest import Manifest
from edgefn.functions.sandbox import FunctionSandbox
from edgefn.journal.outbox import Pending
from edgefn.observe.window import HealthWindow
from edgefn.offload.planner import Planner, Where

log = logging.getLogger("edgefn.dispatch")

Item = tuple[Event, Pending, int]  # an event, its pending entry, its ticket in the lane's order
ReadEvents = Callable[[list[str]], list[Event]]  # whole events from the journal, by id (Inbox.events)


@dataclass
class Lane:
    """A queue of a function's events, the workers that take from it, and where their inference runs.
    Answers leave a lane in the order its events came in. A `None` in the queue stops its workers."""

    where: Where
    workers: int
    queue: queue.Queue[Item | None] = field(default_factory=queue.Queue)
    order: InOrder = field(default_factory=InOrder)

    def put(self, event: Event, pending: Pending) -> None:
        self.order.queue(self.queue, (event, pending))


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

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def local(self) -> Lane:
        return self.lanes["local"]

    def offer(self, event: Event, pending: Pending, under_pressure: bool) -> None:
        """Into a lane (where the planner says) while the function's share has room; else parked, and
        so is every later event until the parked ones have had their turn (arrival order is kept)."""
        with self.share.lock:
            if self.share.parked or not self.share.has_room(pending.size):
                self.share.parked.append(pending)
            else:
                self._into_lane(event, pending, under_pressure)

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
                heads.append(self.share.parked.popleft())
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
        cloud = self.lanes.get("cloud")
        where = self.planner.admit(self.local.queue.qsize(), under_pressure,
                                   cloud.queue.qsize() if cloud is not None else 0)
        self.share.took(pending.size)
        self.lanes.get(where, self.local).put(event, pending)


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
            held += fn.share.parked
            fn.share.parked = deque()
        held.sort(key=lambda pending: int(pending.event_id))  # journal ids follow arrival order
        successor = new.get(fn.name)
        if successor is not None:
            with successor.share.lock:
                successor.share.parked.extend(held)
        else:
            for pending in held:
                answer_nothing(pending, fn)
