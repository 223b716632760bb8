"""The workers of a lane: take the next event and what queued behind it, run them in the sandbox
as one batch, and release each answer (its messages, or its error on `edgefn/errors/<function>`)
to the lane's reorder buffer.

A payload over `max_payload_bytes` is answered with an error without reaching the sandbox, and so
is a shed event (reason `shed`, counted in `edgefn_events_handled_total{outcome="shed"}`). A bug of ours never kills
a worker: the events stay journaled and run again after a restart.

Loops. Every answer's messages carry the event's hop count plus one (`edgefn-hop`, errors too). An event
that went through `max_hops` functions already is not run: it is answered once with reason `loop`,
and that answer (one hop further still) is answered with nothing, so a function that hears its own
outputs, or two that answer each other, stop after a bounded number of events.

Precedence across functions: the device's cores are shared, so a local batch waits before it runs
while more urgent events are queued or running in any function's local lane (`Precedence`), for at
most `PRECEDENCE_WAIT_S` at a time: a steady high-priority stream slows the rest, never stops it.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from edgefn.dispatch.lanes import Item, Lane, LoadedFunction
from edgefn.errors import FunctionError, Loop, PayloadTooLarge, Shed
from edgefn.events import PRIORITIES, RANK, Event, Message
from edgefn.functions.manifest import Manifest
from edgefn.journal.outbox import Pending
from edgefn.observe.logs import Every
from edgefn.observe.metrics import Metrics
from edgefn.observe.usage import UNMETERED
from edgefn.protocol.outputs import HOP
from edgefn.topics import ERRORS_TOPIC

log = logging.getLogger("edgefn.dispatch")

# A batch's payloads sit in the guest's memory at once, copied a few times on the way (and, for a
# component built before handle-latin1, as one 32-byte value slot per byte: 250 kB payloads in a
# batch of 32 held 256 MB of slots). Large payloads gain nothing from a batch (bench/crossing.py
# --pad 250000: 1.0 ms an event alone, 5.4 ms in a batch of 32). Past this many payload bytes a
# batch closes (small events batch as before: 32 digits events weigh about 10 kB).
BATCH_MAX_BYTES = 64 * 1024
PRECEDENCE_WAIT_S = 0.5  # the longest a batch waits at a time for more urgent events elsewhere
Answer = Callable[[Pending, list[Message], Sequence[tuple[str, str]], bool], None]  # Outbox.answer


def error_body(event: Event, reason: str, error: str, fn: Manifest | None = None) -> dict[str, str | None]:
    """The JSON document on an error topic about `event`: the function it failed in (None: no function
    took it), the topic, the reason in a word and the error in a sentence."""
    return {
        "event_id": _payload_id(event),
        "function": fn.name if fn else None,
        "version": fn.version if fn else None,
        "topic": event.topic,
        "reason": reason,
        "error": error,
        "journal_id": event.id,
    }


def error_message(fn: Manifest, event: Event, exc: FunctionError) -> Message:
    """The message on the function's error topic that answers `event` when it failed."""
    body = error_body(event, exc.reason, str(exc), fn)
    return Message(ERRORS_TOPIC.format(function=fn.name), json.dumps(body).encode())


_HEAD_ID = re.compile(rb'^\s*\{.*?"id"\s*:\s*(?:"((?:[^"\\]|\\.)*)"|(-?\d+))', re.S)


def _payload_id(event: Event) -> str | None:
    """The sensor's own event id, when the payload is a JSON object that carries one (of a payload
    journaled as its head only, read from the head)."""
    payload = event.payload
    if event.dropped:
        found = _HEAD_ID.match(payload)
        return None if found is None else (found.group(1) or found.group(2)).decode(errors="replace")
    if len(payload) > 65_536:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    value = doc.get("id") if isinstance(doc, dict) else None
    return str(value) if value is not None else None


def take(q: queue.Queue[Item | None], max_batch: int, max_bytes: int = BATCH_MAX_BYTES) -> list[Item] | None:
    """The lane's next event and what queued up behind it (up to max_batch events, and while the
    payloads stay within max_bytes: the first event always goes); None: stop."""
    first = q.get()
    if first is None:
        q.task_done()
        q.put(None)  # for the lane's next worker
        return None
    batch = [first]
    nbytes = len(first[0].payload)
    while len(batch) < max_batch and nbytes < max_bytes:
        try:
            item = q.get_nowait()
        except queue.Empty:
            break
        if item is None:
            q.task_done()
            q.put(None)  # this worker stops after its batch, the next one too
            break
        batch.append(item)
        nbytes += len(item[0].payload)
    return batch


class Precedence:
    """Which priorities have local events queued or running, daemon-wide: a batch of a lesser one
    waits its turn (see the module docstring)."""

    def __init__(self, max_wait_s: float = PRECEDENCE_WAIT_S):
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._lanes: list[Lane] = []
        self._running = dict.fromkeys(PRIORITIES, 0)

    def watch(self, lanes: list[Lane]) -> None:
        """The local lanes to look at (the functions running now)."""
        with self._cond:
            self._lanes = list(lanes)

    def _more_urgent(self, rank: int) -> bool:
        above = PRIORITIES[:rank]
        if any(self._running[p] for p in above):
            return True
        return bool(above) and any(lane.queue.ahead(above[-1]) for lane in self._lanes)

    def start(self, priority: str) -> None:
        """Before a local batch of `priority` runs: wait while more urgent work waits (bounded)."""
        rank = RANK[priority]
        with self._cond:
            if rank:
                self._cond.wait_for(lambda: not self._more_urgent(rank), timeout=self.max_wait_s)
            self._running[priority] += 1

    def done(self, priority: str) -> None:
        with self._cond:
            self._running[priority] -= 1
            self._cond.notify_all()


class Workers:
    """Starts and runs the workers of every lane; what they share: the payload bound, the metrics,
    and where answers go (the outbox)."""

    def __init__(self, max_payload_bytes: int, metrics: Metrics, answer: Answer,
                 refill: Callable[[LoadedFunction], None], max_hops: int = 8):
        self.max_payload_bytes, self.metrics, self._answer = max_payload_bytes, metrics, answer
        self._refill = refill  # parked events of a function back into its lanes, as far as it has room
        self.max_hops = max_hops
        self.precedence = Precedence()
        self._shed_said, self._loop_ended = Every(10.0), Every(10.0)
        # Each event's outcome and latency series, by function (and outcome): prometheus's labels() takes a
        # lock and checks its labels on every call, a few microseconds an event.
        self._handled: dict[tuple[str, str], Any] = {}
        self._latency: dict[str, Any] = {}

    def start(self, functions: list[LoadedFunction]) -> None:
        self.precedence.watch([fn.local for fn in functions if fn.local.where == "local"])
        for fn in functions:
            for lane in fn.lanes.values():
                for i in range(lane.workers):
                    thread = threading.Thread(target=self.loop, args=(fn, lane), daemon=True,
                                              name=f"edgefn-{fn.name}-{lane.where}-{i}")
                    thread.start()
                    fn.workers.append(thread)
            self._refill(fn)  # what a restart or a hand-over parked

    def loop(self, fn: LoadedFunction, lane: Lane) -> None:
        while True:
            batch = take(lane.queue, fn.manifest.limits.max_batch)
            if batch is None:
                return
            try:
                self.process(fn, lane, batch)
            except Exception:  # a bug of ours must not kill the worker; the events stay journaled
                log.exception("%s: events %s could not be processed", fn.name, [e.id for e, _, _ in batch])
                for _, _, ticket in batch:
                    lane.order.release(ticket)  # unanswered: they run again after a restart
            finally:
                fn.share.freed(len(batch), sum(pending.size for _, pending, _ in batch))
                for _ in batch:
                    lane.queue.task_done()
                if fn.share.parked:
                    try:
                        self._refill(fn)
                    except Exception:  # the journal cannot be read now: the next batch tries again
                        log.exception("%s: parked events could not be read back", fn.name)

    def process(self, fn: LoadedFunction, lane: Lane, batch: list[Item]) -> None:
        limit = self.max_payload_bytes
        events: list[Event] = []
        answers: dict[str, list[Message] | FunctionError] = {}
        for e, _, _ in batch:
            if e.hop >= self.max_hops:  # first: an answer of any kind would go round again
                answers[e.id] = Loop(f"the event went through {e.hop} functions (edgefn-hop), max_hops is "
                                     f"{self.max_hops}: a function hears its own outputs, or functions answer each other")
            elif e.shed:  # past the latency budget under overload, where the manifest allows it
                answers[e.id] = Shed(f"low-priority event shed under overload (latency budget "
                                     f"{fn.manifest.latency_budget_ms:g} ms)")
            elif e.dropped or len(e.payload) > limit:  # refused before it costs the sandbox anything
                answers[e.id] = PayloadTooLarge(f"payload of {e.dropped or len(e.payload)} bytes exceeds "
                                                f"max_payload_bytes ({limit})")
            else:
                events.append(e)
        if events:
            self.metrics.batch_events.labels(fn.name).observe(len(events))
            fn.sandbox.host.plan(lane.where)
            priority = min((e.priority or "normal" for e in events), key=RANK.__getitem__)
            if lane.where == "local":
                self.precedence.start(priority)
            started = time.perf_counter()
            # Usage metering: CPU, bytes (edgefn.observe.usage); a worker process meters its own calls.
            metered = UNMETERED if fn.sandbox.meters_itself else self.metrics.usage.call(fn.name, events)
            try:
                results = fn.sandbox.handle_batch(events)
            finally:
                if lane.where == "local":
                    self.precedence.done(priority)
            metered.done(results)
            answers.update(zip((e.id for e in events), results, strict=True))
            took = time.perf_counter() - started
            if lane.where == "local":
                fn.planner.served_here(len(events), took)
            else:
                fn.planner.served_on_cloud(len(events), took)
        for event, pending, ticket in batch:
            outputs = self.outputs(fn, event, answers[event.id])
            hop = (HOP, str(event.hop + 1))  # before the function's own properties, which follow edgefn's
            outputs = [replace(m, properties=(hop, *m.properties)) for m in outputs]
            urgent = event.priority == "high"  # its answer goes out ahead of others waiting to be sent
            lane.order.release(ticket, lambda p=pending, o=outputs, u=urgent: self._answer(p, o, fn.properties, u))

    def outputs(self, fn: LoadedFunction, event: Event, answer: list[Message] | FunctionError) -> list[Message]:
        """The messages an answer publishes (its results, or its error), with the metrics."""
        took = max(0.0, time.time() - event.received_ms / 1000)
        if not event.replayed:  # an event journaled before a restart would count its downtime as latency
            # An oversized payload is the sender's fault, a shed event the load's: not the release's.
            fn.window.record(not isinstance(answer, FunctionError) or isinstance(answer, (PayloadTooLarge, Shed)), took)
        if isinstance(answer, Loop) and event.hop > self.max_hops:  # the loop's own error, come back: ends here
            self._count(fn.name, answer.reason)
            if (skipped := self._loop_ended.due()) is not None:
                log.warning("%s: event %s on %r: a loop's error came back (edgefn-hop %d), answered with nothing "
                            "(%d more since the last line)", fn.name, event.id, event.topic, event.hop, skipped)
            return []
        if isinstance(answer, Shed):  # a line per event would flood the log under the very overload
            if (skipped := self._shed_said.due()) is not None:
                log.warning("%s: shedding low-priority events under overload (%d more since the last line)",
                            fn.name, skipped)
        elif isinstance(answer, FunctionError):
            log.warning("%s: event %s: %s: %s", fn.name, event.id, answer.reason, answer)
        if isinstance(answer, FunctionError):
            self._count(fn.name, answer.reason)
            answer = [error_message(fn.manifest, event, answer)]
        else:
            self._count(fn.name, "ok")
        latency = self._latency.get(fn.name)
        if latency is None:
            latency = self._latency[fn.name] = self.metrics.event_seconds.labels(fn.name)
        latency.observe(took)
        return answer

    def _count(self, function: str, outcome: str) -> None:
        handled = self._handled.get((function, outcome))
        if handled is None:
            handled = self._handled[(function, outcome)] = self.metrics.events_handled.labels(function, outcome)
        handled.inc()
