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
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefn.dispatch.order import InOrder
from edgefn.events import Event
from edgefn.functions.manifest import Manifest
from edgefn.functions.sandbox import FunctionSandbox
from edgefn.journal.outbox import Pending
from edgefn.observe.window import HealthWindow
from edgefn.offload.planner import Planner, Where

log = logging.getLogger("edgefn.dispatch")

Item = tuple[Event, Pending, int]  # an event, its pending entry, its ticket in the lane's order


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
    workers: list[threading.Thread] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def local(self) -> Lane:
        return self.lanes["local"]


def busy(lanes: list[Lane]) -> bool:
    """Whether any of these lanes still holds an event not finished."""
    return any(lane.queue.unfinished_tasks for lane in lanes)


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
    while busy([lane for _, lane in lanes]):
        if time.monotonic() > deadline:
            log.error("old functions still busy after %.0f s: their queued events go to the new ones", drain_timeout)
            hand_over(lanes, {fn.name: fn for fn in new}, answer_nothing)
            break
        time.sleep(0.01)
    stop_workers([lane for _, lane in lanes])
    for fn in old:
        for thread in fn.workers:
            thread.join()  # a call in a sandbox ends within the function's timeout_ms
        fn.sandbox.close()


def hand_over(lanes: list[tuple[LoadedFunction, Lane]], new: dict[str, LoadedFunction],
              answer_nothing: AnswerNothing) -> None:
    """Move what the old lanes still queue to the new function of the same name (its local lane),
    in order; an event whose function the new release lacks is answered with nothing."""
    for fn, lane in lanes:
        while True:
            try:
                item = lane.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                event, pending, ticket = item
                lane.order.release(ticket)  # its place in the old order: given up, nothing published
                successor = new.get(fn.name)
                if successor is not None:
                    successor.local.put(event, pending)
                else:
                    answer_nothing(pending, fn)
            lane.queue.task_done()
