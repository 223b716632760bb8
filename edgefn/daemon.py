"""The daemon: wires broker, inbox, sandboxes, models and metrics, and owns their lifecycle.

    broker --QoS1 (MQTT 5)--> Ingress.on_message -> Inbox.append_many (group commit) -> PUBACK
      -> work queue -> worker: route by trigger filter -> FunctionSandbox.handle -> host.infer
      -> ModelRegistry -> publish outputs QoS1 -> every PUBACK in -> Inbox.done (batched)
      -> Ingress.answered (room in the inbox for held events)

An event leaves the inbox only after each of its outputs (results or the error message) has been
acknowledged by the broker; after a crash the inbox is replayed, so nothing is lost and a
consumer may see a result twice (same `event_id`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgefn.config import Settings
from edgefn.errors import EdgefnError, FunctionError, PayloadTooLarge
from edgefn.events import Event, Message
from edgefn.functions.build import component_path, discover
from edgefn.functions.manifest import Manifest, load_manifest
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from edgefn.inference.tensors import WireTensor as Tensor
from edgefn.journal.inbox import Inbox
from edgefn.mqtt.connection import Connection
from edgefn.mqtt.ingress import Ingress
from edgefn.mqtt.topics import matches_any
from edgefn.observe.metrics import Metrics, ObserveServer

log = logging.getLogger("edgefn.daemon")
ERRORS_TOPIC = "edgefn/errors/{function}"
_TICK_S = 0.005  # the longest a received event waits for its group's commit
_DONE_EVERY = 10  # answered events leave the inbox every 50 ms, in one transaction


class FunctionHost:
    """The host side of one function's sandbox: its models, its state and its log."""

    def __init__(self, name: str, registry: ModelRegistry, state: StateStore):
        self.name, self.registry, self.state = name, registry, state
        self._log = logging.getLogger(f"edgefn.fn.{name}")

    def state_get(self, key: str) -> bytes | None:
        return self.state.get(self.name, key)

    def state_set(self, key: str, value: bytes) -> None:
        self.state.set(self.name, key, value)

    def infer(self, model: str, inputs: list[Tensor]) -> tuple[list[Tensor], str]:
        return self.registry.infer(model, inputs), "local"

    def log(self, level: int, message: str) -> None:
        self._log.log(level if level in (10, 20, 30, 40, 50) else 20, "%s", message[:4096])


@dataclass
class LoadedFunction:
    """A function, its sandbox, and its own queue: a slow or hostile function backs up only its
    own queue, never its neighbours' (its workers are as many as its instances)."""

    manifest: Manifest
    folder: Path
    sandbox: FunctionSandbox
    queue: queue.Queue[tuple[Event, _Pending] | None] = field(default_factory=queue.Queue)


@dataclass
class _Pending:
    """An event until every function it went to has answered and the broker has every output."""

    event: Event
    functions: int  # functions still working on it
    outputs: int = 0  # outputs awaiting the broker's PUBACK
    failed: bool = False  # an output could not be delivered: keep the event in the inbox
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self) -> bool:
        """One function has answered (its outputs already counted and being published)."""
        with self.lock:
            self.functions -= 1
            return self._complete()

    def acked(self, refused: bool) -> bool:
        with self.lock:
            self.outputs -= 1
            self.failed = self.failed or refused
            return self._complete()

    def _complete(self) -> bool:
        return self.functions == 0 and self.outputs == 0 and not self.failed


def error_message(fn: Manifest, event: Event, exc: FunctionError) -> Message:
    body = {
        "event_id": _payload_id(event.payload),
        "function": fn.name,
        "version": fn.version,
        "topic": event.topic,
        "reason": exc.reason,
        "error": str(exc),
        "journal_id": event.id,
    }
    return Message(ERRORS_TOPIC.format(function=fn.name), json.dumps(body).encode())


def _payload_id(payload: bytes) -> str | None:
    """The sensor's own event id, when the payload is a JSON object that carries one."""
    if len(payload) > 65_536:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    value = doc.get("id") if isinstance(doc, dict) else None
    return str(value) if value is not None else None


class Daemon:
    """One edgefn daemon: `start()`, then `stop()` (the CLI's `run` does both around a signal)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self._done: list[tuple[str, int]] = []  # (event id, payload bytes) answered, not yet forgotten
        self._done_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._route_cache: dict[str, list[LoadedFunction]] = {}
        self.functions: list[LoadedFunction] = []
        self.observe: ObserveServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.runtime = Runtime(s.state_dir / "components")
        self.registry = ModelRegistry(s.models)
        self.state = StateStore(s.state_dir / "state.sqlite")
        for folder in discover(s.functions):
            manifest = load_manifest(folder)
            wasm = component_path(folder, manifest)
            if not wasm.exists():
                raise EdgefnError(f"{folder}: not built yet (run: edgefn fn build {folder})")
            host = FunctionHost(manifest.name, self.registry, self.state)
            for model in manifest.models.use:
                backend = self.registry.get(model)  # load now: a missing model fails the start, not an event
                self.metrics.model_info.labels(model, "fp32-onnx", backend.delegate).set(1)
            self.functions.append(LoadedFunction(manifest, folder, FunctionSandbox(self.runtime, manifest, wasm, host)))
            log.info("function %s %s from %s", manifest.name, manifest.version, folder)
        self.inbox = Inbox(s.state_dir / "inbox.sqlite" if s.journal == "disk" else ":memory:")
        replay = self.inbox.pending()
        if replay:
            log.info("replaying %d events left in the inbox", len(replay))
        filters = sorted({t for f in self.functions for t in f.manifest.trigger.topics})
        # Ingress and the connection exist before any worker can publish (replayed events).
        self.ingress = Ingress(self.inbox, s.inbox_max_events, self._deliver, ack=lambda mid: self.connection.ack(mid),
                               more_waiting=lambda: self.connection.has_more_to_read(), outstanding=len(replay),
                               max_bytes=s.inbox_max_bytes, outstanding_bytes=sum(len(e.payload) for e in replay))
        self.connection = Connection(s, self.ingress.on_message, filters, on_disconnect=self.ingress.disconnected)
        for fn in self.functions:
            for i in range(fn.manifest.limits.instances):
                self._spawn(lambda fn=fn: self._work_loop(fn), f"edgefn-{fn.manifest.name}-{i}")
        self._deliver(replay, replayed=True)
        self._spawn(self._housekeeping, "edgefn-housekeeping")
        self.connection.start()
        if s.metrics_port is not None:
            self.observe = ObserveServer(self.metrics, self.health, s.metrics_port)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def connected(self) -> bool:
        return self.connection.connected.is_set()

    @property
    def broker_error(self) -> str | None:
        return self.connection.last_error

    def wait_connected(self, timeout: float) -> None:
        self.connection.wait_connected(timeout)

    def health(self) -> dict:
        return {
            "status": "ok" if self.connected else "degraded",
            "broker": "connected" if self.connected else (self.broker_error or "connecting"),
            "inbox_events": self.ingress.outstanding,
            "held_unacknowledged": self.ingress.held,
            "functions": {f.manifest.name: f.manifest.version for f in self.functions},
        }

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop taking events, finish those in hand (within the deadline), then close."""
        if self._stopping.is_set():
            return
        self.ingress.close()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (any(f.queue.unfinished_tasks for f in self.functions)
                                               or self._answers_pending()):
            time.sleep(0.01)
        self._stopping.set()
        for fn in self.functions:
            fn.queue.put(None)  # each worker that takes it puts it back for the next
        for thread in self._threads:
            thread.join(timeout=2)
        self._flush_done()
        self.connection.stop()
        if self.observe:
            self.observe.close()
        for f in self.functions:
            f.sandbox.close()
        self.runtime.close()
        self.inbox.close()
        self.state.close()

    def _answers_pending(self) -> bool:
        with self._done_lock:
            return self.ingress.outstanding - len(self._done) > 0

    def _deliver(self, events: list[Event], replayed: bool = False) -> None:
        """Hand journaled events to the queue of each function they trigger."""
        if not replayed:
            self.metrics.events_received.inc(len(events))
        for event in events:
            routes = self._route(event.topic)
            if not routes:
                self._mark_done(event.id, len(event.payload))
                continue
            pending = _Pending(event, len(routes))
            for fn in routes:
                fn.queue.put((event, pending))

    def _route(self, topic: str) -> list[LoadedFunction]:
        hit = self._route_cache.get(topic)
        if hit is None:
            hit = [f for f in self.functions if matches_any(topic, f.manifest.trigger.topics)]
            if len(self._route_cache) > 10_000:
                self._route_cache.clear()
            self._route_cache[topic] = hit
        return hit

    # -- work (each function's own workers) ------------------------------------------------------------
    def _work_loop(self, fn: LoadedFunction) -> None:
        while True:
            batch = self._take(fn)
            if batch is None:
                return
            try:
                self._process(fn, batch)
            except Exception:  # a bug of ours must not kill the worker; the events stay journaled
                log.exception("%s: events %s could not be processed", fn.manifest.name, [e.id for e, _ in batch])
            finally:
                for _ in batch:
                    fn.queue.task_done()

    def _take(self, fn: LoadedFunction) -> list[tuple[Event, _Pending]] | None:
        """The function's next event and what queued up behind it (up to its max_batch); None: stop."""
        first = fn.queue.get()
        if first is None:
            fn.queue.task_done()
            fn.queue.put(None)  # for the function's next worker
            return None
        batch = [first]
        while len(batch) < fn.manifest.limits.max_batch:
            try:
                item = fn.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                fn.queue.task_done()
                fn.queue.put(None)  # this worker stops after its batch, the next one too
                break
            batch.append(item)
        return batch

    def _process(self, fn: LoadedFunction, batch: list[tuple[Event, _Pending]]) -> None:
        limit = self.settings.max_payload_bytes
        runnable = [(e, p) for e, p in batch if len(e.payload) <= limit]
        answers: dict[str, list[Message] | FunctionError] = {
            e.id: PayloadTooLarge(f"payload of {len(e.payload)} bytes exceeds max_payload_bytes ({limit})")
            for e, _ in batch if len(e.payload) > limit}  # refused before it costs the sandbox anything
        if runnable:
            self.metrics.batch_events.labels(fn.manifest.name).observe(len(runnable))
            events = [e for e, _ in runnable]
            answers.update(zip((e.id for e in events), fn.sandbox.handle_batch(events), strict=True))
        for event, pending in batch:
            self._publish(pending, self._settle(fn, event, answers[event.id]))

    def _settle(self, fn: LoadedFunction, event: Event, answer: list[Message] | FunctionError) -> list[Message]:
        """The messages an answer publishes (its results, or its error), with the metrics."""
        name = fn.manifest.name
        if isinstance(answer, FunctionError):
            log.warning("%s: event %s: %s: %s", name, event.id, answer.reason, answer)
            self.metrics.events_handled.labels(name, answer.reason).inc()
            answer = [error_message(fn.manifest, event, answer)]
        else:
            self.metrics.events_handled.labels(name, "ok").inc()
        self.metrics.event_seconds.labels(name).observe(max(0.0, time.time() - event.received_ms / 1000))
        return answer

    def _publish(self, pending: _Pending, outputs: list[Message]) -> None:
        with pending.lock:
            pending.outputs += len(outputs)  # before publishing: a PUBACK may come back at once
        for message in outputs:
            try:
                self.connection.publish(message.topic, message.payload,
                                        lambda refused, t=message.topic: self._output_acked(pending, t, refused))
            except Exception:  # the event stays in the inbox and is answered again after a restart
                log.exception("event %s: could not publish to %r", pending.event.id, message.topic)
                self._output_acked(pending, message.topic, "not published")
        if pending.answered():
            self._mark_done(pending.event.id, len(pending.event.payload))

    def _output_acked(self, pending: _Pending, topic: str, refused: str | None) -> None:
        if refused is not None:
            # The broker said no (not authorized, quota, too large): the event stays in the inbox,
            # to be answered again after a restart, rather than counted as delivered.
            self.metrics.messages_refused.inc()
            log.error("event %s: the message on %r was not delivered: %s", pending.event.id, topic, refused)
        else:
            self.metrics.messages_published.inc()
        if pending.acked(refused is not None):
            self._mark_done(pending.event.id, len(pending.event.payload))

    def _mark_done(self, event_id: str, size: int) -> None:
        with self._done_lock:
            self._done.append((event_id, size))

    # -- housekeeping --------------------------------------------------------------------------------
    def _flush_done(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        if not done:
            return
        try:
            self.inbox.done([event_id for event_id, _ in done])
        except Exception:
            with self._done_lock:
                self._done[:0] = done  # try again next time
            raise
        self.ingress.answered(len(done), sum(size for _, size in done))

    def _housekeeping(self) -> None:
        tick = 0
        while not self._stopping.wait(_TICK_S):
            try:
                self.ingress.flush()  # a group left behind by a non-event packet
                tick += 1
                if tick % _DONE_EVERY == 0:
                    self._flush_done()
                    self.metrics.inbox_depth.set(self.ingress.outstanding)
                    self.metrics.broker_connected.set(1 if self.connected else 0)
            except Exception:  # e.g. the disk is full: keep trying, loudly
                log.exception("housekeeping failed; retrying")
                time.sleep(0.5)
