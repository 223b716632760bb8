"""The sandbox: one wasmtime engine per process, one pool of warm instances per function.

A guest gets only what the `edgefn:function` world imports (host.infer, log, state, info) plus
WASI with no preopened directory, no socket permission and no inherited stdio: no files, no
network. Each instance has a memory limit; each event a wall-clock deadline enforced by epoch
interruption. An instance that trapped, timed out or ran out of memory is thrown away, and the
next event gets a fresh one. A batch that fails is bisected to find its culprit; a payload that
keeps failing is quarantined (edgefn/functions/quarantine.py).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import queue
import re
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import wasmtime
from wasmtime import component as wc

from edgefn.errors import (
    BuildError,
    FunctionError,
    GuestError,
    GuestOutOfMemory,
    GuestTimeout,
    GuestTrap,
    OutputRejected,
    Quarantined,
)
from edgefn.events import Event, Message
from edgefn.files import file_sha256, remove_leftovers
from edgefn.functions import compile as compiler
from edgefn.functions import memory
from edgefn.functions._boundary import ExportCall, add_host_func
from edgefn.functions.manifest import Manifest
from edgefn.functions.quarantine import Quarantine
from edgefn.inference.tensors import WireTensor as Tensor  # (dtype, shape, raw little-endian bytes)
from edgefn.protocol.outputs import RESERVED_PREFIX
from edgefn.topics import matches_any, topic_problem

log = logging.getLogger("edgefn.sandbox")
_WASMTIME_VERSION = importlib.metadata.version("wasmtime")
HOST_INTERFACE = "edgefn:function/host@0.1.0"
EPOCH_TICK_S = 0.01  # deadline granularity


class Host(Protocol):
    """What a guest can reach on the host side; one per function."""

    def infer(self, model: str, inputs: list[Tensor]) -> tuple[list[Tensor], str]: ...
    def log(self, level: int, message: str) -> None: ...
    def state_get(self, key: str) -> bytes | None: ...
    def state_set(self, key: str, value: bytes) -> None: ...


class Runtime:
    """The process-wide wasmtime engine, its epoch ticker and the compiled-component cache."""

    def __init__(self, cache_dir: Path):
        self.engine = compiler.engine()
        self.cache_dir = Path(cache_dir)
        if self.cache_dir.is_dir() and (left := remove_leftovers(self.cache_dir)):
            log.info("removed %d unfinished files an interrupted compile left in %s", len(left), self.cache_dir)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="edgefn-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()

    def load(self, wasm: Path) -> wc.Component:
        """The component for `wasm`, compiled for this CPU once, in a child process, then mapped from
        the cache. Compiling peaks at hundreds of MB: in the daemon, that would stay in its RSS."""
        digest = file_sha256(Path(wasm))[:32]
        cached = self.cache_dir / f"{digest}-wasmtime{_WASMTIME_VERSION}.cwasm"
        if cached.exists() and (component := self._mapped(cached)) is not None:
            return component
        # Seconds to minutes on a small board: say so before, and how long it took after.
        log.info("%s: compiling for this CPU (once; then cached in %s)", wasm, self.cache_dir)
        started = time.monotonic()
        try:
            compiler.compile_in_child(Path(wasm), cached)
            log.info("%s: compiled in %.1f s", wasm, time.monotonic() - started)
        except OSError as exc:  # a full or read-only disk: run it uncached rather than not at all
            log.error("%s: cannot cache the compiled component (%s); compiling it in the daemon", wasm, exc)
            try:
                return wc.Component.from_file(self.engine, str(wasm))
            except wasmtime.WasmtimeError as error:
                raise BuildError(f"{wasm}: not a loadable component: {error}") from None
        component = self._mapped(cached)
        if component is None:
            raise BuildError(f"{wasm}: its freshly compiled artifact does not load")
        return component

    def _mapped(self, cached: Path) -> wc.Component | None:
        """The cached artifact mapped, if it is whole; a damaged one is removed (to be compiled again):
        mapping one can kill the process before any error can be caught."""
        problem = compiler.problem_with(cached)
        if problem is None:
            try:
                return wc.Component.deserialize_file(self.engine, str(cached))
            except wasmtime.WasmtimeError as exc:  # another wasmtime's, or another CPU's
                problem = " ".join(str(exc).split())
        log.error("%s: not mapped (%s); compiling it again", cached.name, problem)
        cached.unlink(missing_ok=True)
        compiler.checksum_of(cached).unlink(missing_ok=True)
        return None

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A frame of a guest traceback. componentize-py bundles each source folder as /<n>/ (the function's
# own is /0/): the path shown is the one in the function's folder.
_FRAME = re.compile(r'^\s+File "(?:/\d+/)?(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>.+)$')


class _GuestStderr:
    """Where an instance's stderr goes: a small private file, read only after a trap to name the
    guest's exception. (A file, not a Python callback: wasmtime writes it from its own threads,
    and may do so while the store is being dropped.)"""

    LIMIT = 8192

    def __init__(self, function: str):
        fd, self.path = tempfile.mkstemp(prefix=f"edgefn-{function}-", suffix=".stderr")
        os.close(fd)

    def tail(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - self.LIMIT))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def last_exception(self) -> str | None:
        """The `Type: message` line of the guest's last Python traceback, if it printed one, with where
        it was raised: "KeyError: 'missing' (app.py line 12, in handle)"."""
        lines = self.tail().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
        if not starts:
            return None
        where = None
        for line in lines[starts[-1] + 1:]:
            if (frame := _FRAME.match(line)) is not None:
                where = f"{frame['file']} line {frame['line']}, in {frame['function']}"
                continue
            if line.startswith("object type name:"):  # CPython's report when it cannot print
                return line.split(":", 1)[1].strip()
            if line and not line.startswith((" ", "object ", "lost sys", "thread ")):
                return line.strip() + (f" ({where})" if where else "")
        return None

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


@dataclass
class _Instance:
    store: wasmtime.Store
    handle: ExportCall
    handle_batch: ExportCall | None  # absent from components built against an older world
    stderr: _GuestStderr
    events: int = 0
    memories: list[int] = field(default_factory=list)  # the bases of its linear memories (edgefn.functions.memory)


def _message(fields: tuple[Any, ...]) -> Message:
    """A `message` record as lifted: (topic, payload, qos, retain, properties), or (topic, payload)
    from a component built against the world before qos, retain and properties (QoS1, not retained)."""
    if len(fields) == 2:
        return Message(*fields)
    topic, payload, qos, retain, properties = fields
    return Message(topic, payload, qos, retain, tuple(properties))


def _classify(exc: wasmtime.WasmtimeError, stderr: _GuestStderr, timeout_ms: int, memory_mb: int) -> FunctionError:
    """Map a wasmtime error to why the event failed, from the trap kind and the guest's traceback."""
    text = str(exc)
    cause = text.rsplit("wasm trap:", 1)[-1].strip().splitlines()[0] if "wasm trap:" in text else ""
    if cause == "interrupt":
        return GuestTimeout(f"ran past its {timeout_ms} ms deadline")
    if "call stack exhausted" in cause:
        return GuestTrap("stack overflow")
    raised = stderr.last_exception()
    if (raised and raised.startswith("MemoryError")) or "memory" in cause:
        return GuestOutOfMemory(f"exceeded its {memory_mb} MiB memory limit")
    if raised:
        return GuestTrap(f"uncaught exception: {raised}")
    return GuestTrap(f"trapped: {cause or text.strip().splitlines()[0]}")


class _CallCosts:
    """Running averages of what a failed call costs (the trap, then a fresh instance) and what a
    good call of one event costs, in seconds: they say whether halving a failed batch pays.

    Halving answers the good half in one call instead of a call each, and costs one more failed
    call when the culprit is in the other half: it pays while a half holds more events than a
    failed call costs in calls alone. Measured, because that varies by guest and machine: for the
    digits example a trap costs about 9 calls alone, so a failed batch of 32 is halved once and
    then runs event by event; a guest whose calls are dear is halved down to the culprit. Until
    both are measured, a failed batch is halved."""

    def __init__(self) -> None:
        self.failed = self.alone = 0.0  # 0: not measured yet

    def note(self, seconds: float, *, failed: bool, events: int) -> None:
        if failed:
            self.failed = 0.8 * self.failed + 0.2 * seconds if self.failed else seconds
        elif events == 1:
            self.alone = 0.8 * self.alone + 0.2 * seconds if self.alone else seconds

    def halving_pays(self, events: int) -> bool:
        return not (self.failed and self.alone) or events / 2 * self.alone > self.failed


def _lowered(event: Event) -> tuple[str, str, bytes, float]:
    return event.id, event.topic, event.payload, event.received_ms


class FunctionSandbox:
    """A function's compiled component and its pool of warm instances.

    `quarantine`: True for a `Quarantine` with its defaults, False for none, or one of your own."""

    def __init__(self, runtime: Runtime, manifest: Manifest, wasm: Path, host: Host, instances: int | None = None,
                 quarantine: Quarantine | bool = True):
        self.runtime, self.manifest, self.host = runtime, manifest, host
        self.limits = manifest.limits
        self.instances = instances or self.limits.instances  # the pool's size
        self.quarantine = Quarantine() if quarantine is True else (quarantine or None)
        self.component = runtime.load(wasm)
        self._linker = self._make_linker()
        self._idle: queue.LifoQueue[_Instance] = queue.LifoQueue()
        self._deadline_ticks = max(1, round(self.limits.timeout_ms / 1000 / EPOCH_TICK_S))
        self._closed = False
        self._allowed_topics: dict[str, bool] = {}
        self._missing = 0  # pool slots whose instance could not be renewed yet
        self._missing_lock = threading.Lock()
        self._costs = _CallCosts()
        self._live: weakref.WeakValueDictionary[int, _Instance] = weakref.WeakValueDictionary()  # for memory_bytes
        for _ in range(self.instances):
            self._idle.put(self._new_instance())
        # Components built against an older world have no handle-batch: they get events one by one.
        self._batches = self._idle.queue[0].handle_batch is not None

    def _make_linker(self) -> wc.Linker:
        linker = wc.Linker(self.runtime.engine)
        linker.add_wasip2()
        info = (self.manifest.name, self.manifest.version)
        allowed = set(self.manifest.models.use)
        host = self.host

        def infer(model: str, inputs: list[Tensor]) -> tuple[bool, Any]:
            if model not in allowed:
                return False, f"model {model!r} is not listed in [models] use of {info[0]}'s manifest"
            try:
                return True, host.infer(model, inputs)
            except Exception as exc:  # the guest gets the reason as an error value
                return False, str(exc)

        with linker.root() as root, root.add_instance(HOST_INTERFACE) as iface:
            add_host_func(iface, "infer", infer)
            add_host_func(iface, "log", host.log)
            add_host_func(iface, "state-get", host.state_get)
            add_host_func(iface, "state-set", host.state_set)
            add_host_func(iface, "info", lambda: info)
        return linker

    def _new_instance(self) -> _Instance:
        store = wasmtime.Store(self.runtime.engine)
        store.set_limits(memory_size=self.limits.memory_mb << 20)
        wasi = wasmtime.WasiConfig()  # no preopened dirs, no env, no sockets: no files, no network
        stderr = _GuestStderr(self.manifest.name)
        wasi.stderr_file = stderr.path
        store.set_wasi(wasi)
        store.set_epoch_deadline(1 << 62)  # instantiation runs the guest's start code
        try:
            with memory.watch() as memories:
                instance = self._linker.instantiate(store, self.component)
        except wasmtime.WasmtimeError as exc:
            raise BuildError(f"{self.manifest.name}: cannot instantiate: {exc}") from None
        func = instance.get_func(store, "handle")
        if func is None:
            raise BuildError(f"{self.manifest.name}: the component exports no `handle`")
        batch = instance.get_func(store, "handle-batch")
        made = _Instance(store, ExportCall(store, func), batch and ExportCall(store, batch), stderr, memories=memories)
        self._live[id(made)] = made
        weakref.finalize(store, memory.forget, memories)  # its memories are unmapped with it
        return made

    def memory_bytes(self) -> int:
        """The linear memory of the largest instance alive now (a guest's memory never shrinks: its peak)."""
        return max(memory.sizes([inst.memories for inst in list(self._live.values())]), default=0)

    def handle(self, event: Event) -> list[Message]:
        """Run one event on a warm instance; FunctionError says why it could not be handled."""
        answer = self.handle_batch([event])[0]
        if isinstance(answer, FunctionError):
            raise answer
        return answer

    def handle_batch(self, events: list[Event]) -> list[list[Message] | FunctionError]:
        """Run events that queued up together in as few calls as possible; one answer (messages or
        the error) each, in order.

        A quarantined payload is answered `Quarantined` without running. A suspect (it failed
        before) runs alone, so it cannot spoil a batch again; the other events run in order, as
        batches between suspects (see `_bisect`)."""
        answers: list[list[Message] | FunctionError | None] = [None] * len(events)
        waiting: list[int] = []  # events to run together, in order, up to the next suspect

        def run_waiting() -> None:
            for i, answer in zip(waiting, self._bisect([events[i] for i in waiting]), strict=True):
                answers[i] = answer
            waiting.clear()

        for i, event in enumerate(events):
            verdict = self.quarantine.screen(event.payload) if self.quarantine is not None else False
            if isinstance(verdict, Quarantined):
                answers[i] = verdict
            elif verdict:
                run_waiting()
                answers[i] = self._one(event)
            else:
                waiting.append(i)
        run_waiting()
        return answers  # type: ignore[return-value]  (every slot is filled)

    def _bisect(self, events: list[Event]) -> list[list[Message] | FunctionError]:
        """Run events as one batch; if it traps or runs out of memory, the culprit is unknown, so
        each half runs as a batch of its own, recursively: the good events get their answers from
        the halves that succeed, the culprit ends alone and its error lands on it. Only a failed
        call throws its instance away; a half that succeeds leaves its instance warm. Each half
        is screened again: once a culprit is struck, the events of its shape still in the batch
        run alone (or are refused) instead of failing more halves. Where a failed call costs
        more than the calls halving would spare, the events run alone instead (`_CallCosts`).

        An event of a failed batch runs again (as any re-run does): state updates from the failed
        call are not undone."""
        if len(events) <= 1 or not self._batches:
            return [self._one(e) for e in events]
        try:
            answers = self._call(lambda inst: inst.handle_batch([_lowered(e) for e in events]), len(events))
        except FunctionError as exc:
            # A timed-out batch is never halved: its deadline is the per-event one times its events,
            # and halves would run the endless event again under half of it, a quarter, ... (about
            # one more batch deadline in all); alone it costs one per-event deadline.
            if isinstance(exc, GuestTimeout) or not self._costs.halving_pays(len(events)):
                return [answer for e in events for answer in self.handle_batch([e])]  # each alone, screened again
            half = len(events) // 2
            return self.handle_batch(events[:half]) + self.handle_batch(events[half:])
        if len(answers) != len(events):  # a guest's handle-batch that miscounts: take its events one by one
            return [self._one(e) for e in events]
        return [self._answer(ok, value) for ok, value in answers]

    def _one(self, event: Event) -> list[Message] | FunctionError:
        """Run one event alone: a trap, timeout or out-of-memory here is its own, a strike against its payload."""
        try:
            return self._answer(*self._call(lambda inst: inst.handle(_lowered(event)), 1))
        except FunctionError as exc:
            if self.quarantine is not None:
                self.quarantine.strike(event.payload, exc)
            return exc

    def _answer(self, ok: bool, value: Any) -> list[Message] | FunctionError:
        if not ok:
            return GuestError(str(value))
        try:
            return self._check_outputs([_message(fields) for fields in value])
        except FunctionError as exc:
            return exc

    def _call(self, call: Any, events: int) -> Any:
        """`call(instance)` on a warm instance under a deadline of `events` times the per-event one."""
        if self._closed:
            raise FunctionError(f"{self.manifest.name} is closed")
        inst = self._take()
        started = time.perf_counter()
        keep, failure = True, None
        try:
            inst.handle.set_deadline(self._deadline_ticks * events)
            try:
                result = call(inst)
            except wasmtime.WasmtimeError as exc:
                keep, failure = False, _classify(exc, inst.stderr, self.limits.timeout_ms, self.limits.memory_mb)
                raise failure from None
            except Exception as exc:  # a host function or the boundary failed mid-call
                keep = False
                raise GuestTrap(f"host side failed during the call: {type(exc).__name__}: {exc}") from exc
            inst.events += events
            return result
        finally:
            # The guest's heap grows slowly even in a well-behaved function (componentize-py's
            # runtime), so an instance is renewed after `recycle_after` events.
            if keep and inst.events < self.limits.recycle_after:
                self._idle.put(inst)
            else:
                inst.stderr.remove()
                self._renew()
            if not isinstance(failure, GuestTimeout):  # it cost its deadline; a timed-out batch is never halved
                self._costs.note(time.perf_counter() - started, failed=not keep, events=events)

    def _renew(self) -> None:
        """Put a fresh instance in the pool; if that fails now (no memory, /tmp full), the slot is
        remembered and filled by a later `_take` instead of being lost for good."""
        if self._closed:
            return
        try:
            self._idle.put(self._new_instance())
        except Exception:
            log.exception("%s: cannot create an instance; will retry", self.manifest.name)
            with self._missing_lock:
                self._missing += 1

    def _take(self) -> _Instance:
        while True:
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                with self._missing_lock:
                    if not self._missing:
                        continue
                    self._missing -= 1
                self._renew()

    def _check_outputs(self, messages: list[Message]) -> list[Message]:
        limits, allowed = self.limits, self.manifest.publish.topics
        if len(messages) > limits.max_messages:
            raise OutputRejected(f"{len(messages)} messages exceed the limit of {limits.max_messages}")
        size = sum(len(m.payload) for m in messages)
        if size > limits.max_output_bytes:
            raise OutputRejected(f"{size} output bytes exceed the limit of {limits.max_output_bytes}")
        for m in messages:
            if m.qos not in (0, 1) or m.retain or m.properties:
                self._check_delivery(m)
            ok = self._allowed_topics.get(m.topic)
            if ok is None:
                problem = topic_problem(m.topic)
                if problem:
                    raise OutputRejected(f"topic {m.topic!r:.80} {problem}")
                ok = matches_any(m.topic, allowed)
                if len(self._allowed_topics) < 10_000:  # topics are per device: bounded, but be safe
                    self._allowed_topics[m.topic] = ok
            if not ok:
                raise OutputRejected(f"topic {m.topic!r} is not in the manifest's [publish] topics")
        return messages

    def _check_delivery(self, m: Message) -> None:
        """QoS, retain and user properties, against the manifest's `[publish]` bounds."""
        publish = self.manifest.publish
        if m.qos not in (0, 1):
            raise OutputRejected(f"qos {m.qos} on {m.topic!r:.80}: only 0 and 1 are offered")
        if m.retain and not publish.retain:
            raise OutputRejected(f"a retained message on {m.topic!r:.80}, but the manifest's [publish] "
                                 "does not allow retain")
        if len(m.properties) > publish.max_properties:
            raise OutputRejected(f"{len(m.properties)} user properties on {m.topic!r:.80} exceed the "
                                 f"limit of {publish.max_properties}")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in m.properties)
        if size > publish.max_property_bytes:
            raise OutputRejected(f"{size} bytes of user properties on {m.topic!r:.80} exceed the limit "
                                 f"of {publish.max_property_bytes}")
        for key, _ in m.properties:
            if key.lower().startswith(RESERVED_PREFIX):
                raise OutputRejected(f"user property {key!r:.80}: keys starting {RESERVED_PREFIX!r} "
                                     "are the daemon's")

    def close(self) -> None:
        """Drop the warm instances (idempotent); events still running finish on theirs."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().stderr.remove()
            except queue.Empty:
                return
