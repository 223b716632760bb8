"""The sandbox: one wasmtime engine per process, one elastic pool of instances per function.

A guest gets only what the `edgefn:function` world imports (host.infer, log, state, info) plus
WASI with no preopened directory, no socket permission and no inherited stdio: no files, no
network. Each instance has a memory limit; each event a wall-clock deadline enforced by epoch
interruption. An instance that trapped, timed out or ran out of memory is thrown away, and the
next event gets a fresh one. A batch that fails is bisected to find its culprit (a batch whose
stack ran out runs its deeply nested JSON alone first); a payload that keeps failing, or JSON as
deep as payloads that kept overflowing the stack, is quarantined (edgefn/functions/quarantine.py).

The pool is elastic, between the manifest's min_instances and max_instances. An event that finds
no idle instance waits for one for up to `SCALE_UP_SHARE` of the function's latency budget (counted
from its arrival), then a new instance is made for it, if the device's memory budget
(edgefn/functions/budget.py) has room; else it waits on until an instance or room comes back: it
is never dropped. With no instance at all (scaled to zero), the first event makes one at once: the
compiled component and the linker stay loaded, so this cold start costs an instantiation only. An
instance idle for `idle_s` is released, down to min_instances, by the runtime's pool keeper.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
    GuestStackOverflow,
    GuestTimeout,
    GuestTrap,
    OutputRejected,
    Quarantined,
)
from edgefn.events import Event, Message
from edgefn.files import file_sha256, remove_leftovers
from edgefn.functions import compile as compiler
from edgefn.functions import memory, trial
from edgefn.functions._boundary import ExportCall, add_host_func
from edgefn.functions.budget import MemoryBudget, anon_rss_bytes, return_freed_memory
from edgefn.functions.manifest import Manifest
from edgefn.functions.quarantine import Quarantine, nesting
from edgefn.inference.tensors import WireTensor as Tensor  # (dtype, shape, raw little-endian bytes)
from edgefn.protocol.outputs import RESERVED_PREFIX
from edgefn.topics import matches_any, topic_problem

log = logging.getLogger("edgefn.sandbox")
HOST_INTERFACE = "edgefn:function/host@0.1.0"
EPOCH_TICK_S = 0.01  # deadline granularity
SCALE_UP_SHARE = 0.25  # of the latency budget an event waits for an idle instance before one is added
KEEP_EVERY_S = 0.05  # how often idle instances are looked at for release
_MIN_INSTANCE_BYTES = 1 << 20  # the least an instance is counted for (a measurement can come out low)


class Host(Protocol):
    """What a guest can reach on the host side; one per function."""

    def infer(self, model: str, inputs: list[Tensor]) -> tuple[list[Tensor], str]: ...
    def log(self, level: int, message: str) -> None: ...
    def state_get(self, key: str) -> bytes | None: ...
    def state_set(self, key: str, value: bytes) -> None: ...


class Runtime:
    """The process-wide wasmtime engine, its epoch ticker, the compiled-component cache, the memory
    budget every function's instances share (`memory_budget_mb`; None: unbounded) and the pool
    keeper that releases idle instances. `watch_memory`: note each instance's linear memories as it is
    made (one read of the process's memory map, for usage metering's peak memory); always done under a
    budget, which counts each instance for what its own memories hold (`memory.private_bytes`)."""

    def __init__(self, cache_dir: Path, memory_budget_mb: int | None = None, *, watch_memory: bool = True):
        self.engine = compiler.engine()
        self.watch_memory = watch_memory or memory_budget_mb is not None
        self.budget = MemoryBudget(None if memory_budget_mb is None else memory_budget_mb << 20)
        self._pools: weakref.WeakSet[FunctionSandbox] = weakref.WeakSet()
        # sha256 -> the component loaded from those bytes, while a function holds it (`load`).
        self._components: weakref.WeakValueDictionary[str, wc.Component] = weakref.WeakValueDictionary()
        self.target = compiler.host_target()
        self.cache_dir = Path(cache_dir)
        if self.cache_dir.is_dir() and (left := remove_leftovers(self.cache_dir)):
            log.info("removed %d unfinished files an interrupted compile left in %s", len(left), self.cache_dir)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="edgefn-epoch", daemon=True)
        self._ticker.start()
        # Apart from the ticker: dropping a store takes milliseconds, which would delay deadlines.
        self._keeper = threading.Thread(target=self._keep, name="edgefn-pool-keeper", daemon=True)
        self._keeper.start()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()

    def register(self, pool: FunctionSandbox) -> None:
        self._pools.add(pool)

    def _keep(self) -> None:
        while not self._stop.wait(KEEP_EVERY_S):
            for pool in list(self._pools):
                try:
                    pool.keep()
                except Exception:  # a bug of ours must not stop scaling down for every function
                    log.exception("%s: idle instances could not be looked after", pool.manifest.name)

    def load(self, wasm: Path) -> wc.Component:
        """The component for `wasm`: the artifact shipped beside it for this CPU's target when its stamp
        matches (no compile at all), else compiled for this CPU once, in a child process, then mapped from
        the cache. Compiling peaks at hundreds of MB: in the daemon, that would stay in its RSS. An artifact
        not trusted yet is loaded in a child first (edgefn/functions/trial.py): one that crashes it is not
        mapped here. Functions of the same component (the same bytes: copies that differ in their manifests)
        share it, loaded once while any of them holds it: loaded per function, its compiled code was mapped
        once each (about 20 MiB more RSS per digits function, though the page cache holds those pages once)."""
        digest = file_sha256(Path(wasm))
        component = self._components.get(digest)
        if component is None:
            component = self._components[digest] = self._load(Path(wasm), digest)
        return component

    def _load(self, wasm: Path, digest: str) -> wc.Component:
        shipped = compiler.precompiled(Path(wasm), self.target)
        if shipped.exists() and (component := self._shipped(shipped, digest)) is not None:
            return component
        cached = self.cache_dir / f"{digest[:32]}-wasmtime{compiler.WASMTIME_VERSION}.cwasm"
        if cached.exists():
            if isinstance(mapped := self._mapped(cached, digest), wc.Component):
                return mapped
            log.error("%s: not mapped (%s); compiling it again", cached.name, mapped)
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
        if isinstance(mapped := self._mapped(cached, digest), str):  # the error is the one line that says it
            raise BuildError(f"{wasm}: its freshly compiled artifact {cached.name} does not load ({mapped})")
        return mapped

    def _shipped(self, artifact: Path, digest: str) -> wc.Component | None:
        """The artifact shipped beside a component (a bundle's, or `edgefn fn build --target`'s) mapped when
        its stamp says: this wasmtime, this target, this component, these bytes. It is never removed (a
        bundle's folder does not change): a mismatch compiles here as if nothing were shipped."""
        problem = compiler.problem_with(artifact, digest, self.target) or self._crashes(artifact)
        if problem is None:
            try:
                return wc.Component.deserialize_file(self.engine, str(artifact))
            except wasmtime.WasmtimeError as exc:  # features this CPU lacks: wasmtime's own check
                problem = " ".join(str(exc).split())
        log.warning("%s: not used (%s); compiling for this CPU instead", artifact, problem)
        return None

    def _mapped(self, cached: Path, digest: str) -> wc.Component | str:
        """The cached artifact mapped if it is whole, else why not; a damaged one is removed (to be
        compiled again): mapping one can kill the process before any error can be caught."""
        problem = compiler.problem_with(cached, digest, self.target) or self._crashes(cached)
        if problem is None:
            try:
                return wc.Component.deserialize_file(self.engine, str(cached))
            except wasmtime.WasmtimeError as exc:  # another wasmtime's, or another CPU's
                problem = " ".join(str(exc).split())
        cached.unlink(missing_ok=True)
        compiler.stamp_of(cached).unlink(missing_ok=True)
        return problem

    def _crashes(self, artifact: Path) -> str | None:
        """Why an artifact whose stamp matches must still not be mapped: loading it in a child killed the
        child (its verdict is kept in the cache, so a trusted artifact costs no child at the next start)."""
        crash = trial.crash_of(artifact, compiler.stamped_sha256(artifact), self.cache_dir)
        return None if crash is None else f"loading it killed a trial process with {crash}"

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self._keeper.join()

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
    handle_latin1: ExportCall | None  # the same: such a component's payloads cross as byte lists
    stderr: _GuestStderr
    events: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    reserved: int = 0  # bytes of the memory budget it holds
    made_bytes: int = 0  # what instantiating it added to the process's own memory
    written: int | None = None  # its memories' own bytes before its first call (`FunctionSandbox._own`)

    def drop(self) -> None:
        """Free the store (its linear memory goes back to the OS) and the stderr file."""
        self.stderr.remove()
        self.store.close()
    memories: list[int] = field(default_factory=list)  # the bases of its linear memories (edgefn.functions.memory)


def _message(fields: tuple[Any, ...]) -> Message:
    """A `message` or `message-latin1` record as lifted: (topic, payload, qos, retain, properties), or
    (topic, payload) from a component built against the world before qos, retain and properties (QoS1,
    not retained)."""
    if len(fields) == 2:
        return Message(*fields)
    topic, payload, qos, retain, properties = fields
    if isinstance(payload, str):  # message-latin1: each character one byte
        try:
            payload = payload.encode("latin-1")
        except UnicodeEncodeError:
            raise OutputRejected(f"a message to {topic!r:.80} carries a character past U+00FF in its latin-1 "
                                 "payload") from None
    return Message(topic, payload, qos, retain, tuple(properties))


# A frame of wasmtime's backtrace: "   4: 0xe6b16a - libpython3.14.so!_parse_array_unicode" (or without the address).
_WASM_FRAME = re.compile(r"^\s*\d+: (?:0x[0-9a-f]+ - )?(?:[^!\s]+!)?(?P<function>.+)$", re.MULTILINE)


def _recursion(text: str) -> str:
    """The guest functions that recur among the frames a stack overflow's backtrace shows: where it
    recursed, the same however deep it went (the innermost frames, an allocator say, vary with the depth)."""
    frames = _WASM_FRAME.findall(text.split("Caused by:", 1)[0])
    return ", ".join(sorted({f for f in frames if frames.count(f) > 1}))


def _classify(exc: wasmtime.WasmtimeError, stderr: _GuestStderr, timeout_ms: int, memory_mb: int) -> FunctionError:
    """Map a wasmtime error to why the event failed, from the trap kind and the guest's traceback."""
    text = str(exc)
    cause = text.rsplit("wasm trap:", 1)[-1].strip().splitlines()[0] if "wasm trap:" in text else ""
    if cause == "interrupt":
        return GuestTimeout(f"ran past its {timeout_ms} ms deadline")
    if "call stack exhausted" in cause:
        return GuestStackOverflow(where=_recursion(text))
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


def _carried(events: list[Event]) -> list[tuple[str, str, str, float]]:
    """Events as `event-latin1` records: a string of one code point per byte crosses as one byte vector."""
    return [(e.id, e.topic, e.payload.decode("latin-1"), e.received_ms) for e in events]


def _run_batch(inst: _Instance, events: list[Event]) -> list[tuple[bool, Any]]:
    if inst.handle_latin1 is not None:
        return inst.handle_latin1(_carried(events))
    assert inst.handle_batch is not None  # a component without either gets events one by one
    return inst.handle_batch([_lowered(e) for e in events])


def _run_one(inst: _Instance, event: Event) -> tuple[bool, Any]:
    if inst.handle_latin1 is None:
        return inst.handle(_lowered(event))
    answers = inst.handle_latin1(_carried([event]))
    return answers[0] if len(answers) == 1 else (False, f"handle-latin1 gave {len(answers)} answers for one event")


class FunctionSandbox:
    """A function's compiled component and its elastic pool of instances.

    `max_instances` overrides the manifest's upper bound (the daemon gives it the workers of all the
    function's lanes). `quarantine`: True for a `Quarantine` with its defaults, False for none, or one
    of your own."""

    meters_itself = False  # its calls are metered by the worker that makes them (edgefn.observe.usage)

    def __init__(self, runtime: Runtime, manifest: Manifest, wasm: Path, host: Host,
                 max_instances: int | None = None, quarantine: Quarantine | bool = True):
        self.runtime, self.manifest, self.host = runtime, manifest, host
        self.limits = manifest.limits
        least, most = self.limits.instance_bounds
        self.max_instances = max(max_instances or most, 1)
        self.min_instances = min(least, self.max_instances)
        self.budget = runtime.budget
        self.quarantine = Quarantine() if quarantine is True else (quarantine or None)
        self.component = runtime.load(wasm)
        self._linker = self._make_linker()
        self._cond = threading.Condition()  # guards the pool: _idle, _live
        self._idle: list[_Instance] = []  # a stack: the warmest on top, the longest idle at [0]
        self._live = 0  # idle, busy and being made
        self._scale_after_s = SCALE_UP_SHARE * manifest.latency_budget_ms / 1000
        self._arrival = threading.local()  # the oldest event of the batch a worker runs (its wait counts)
        self._deadline_ticks = max(1, round(self.limits.timeout_ms / 1000 / EPOCH_TICK_S))
        self._closed = False
        self._allowed_topics: dict[str, bool] = {}
        self._failed_at = 0.0  # when an instance could last not be made (not again for a second)
        self._costs = _CallCosts()
        self.cold_starts = 0  # instances made because an event found none
        self.cold_start_ms = 0.0  # what making the last of them took
        self._made: weakref.WeakValueDictionary[int, _Instance] = weakref.WeakValueDictionary()  # for memory_bytes
        probe = self._probe()
        # Components built against an older world have no handle-batch: they get events one by one.
        self._batches = probe.handle_batch is not None or probe.handle_latin1 is not None
        if self.min_instances and self.budget.reserve(self.instance_bytes):
            self._live, probe.reserved = 1, self.instance_bytes
            self._idle.append(probe)
        else:
            probe.drop()
        self._top_up()
        runtime.register(self)

    def _probe(self) -> _Instance:
        """A first instance, made at load so that a broken component fails the load and not an event;
        what instantiating it added is what each instance is counted for, until an instance's first
        call shows more (`_measured_first_call`)."""
        self._creations: list[int] = []  # what the last instantiations added to the process's own memory
        self._first_calls: list[int] = []  # what the last instances' first calls added to their memories
        self._releases: list[int] = []  # what the last instances released held, each
        probe = self._new_instance()
        self._estimate()
        log.debug("%s: an instance holds about %.1f MiB", self.manifest.name, self.instance_bytes / 2**20)
        return probe

    @property
    def instances(self) -> int:
        """The instances the function holds now (idle, busy, being made)."""
        return self._live

    def pool(self) -> dict[str, float | int]:
        """The pool's bounds and state, for /healthz."""
        with self._cond:
            live, idle = self._live, len(self._idle)
        return {"instances": live, "idle": idle, "min": self.min_instances, "max": self.max_instances,
                "instance_mb": round(self.instance_bytes / 2**20, 1), "cold_starts": self.cold_starts,
                "last_cold_start_ms": round(self.cold_start_ms, 2)}

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
            with memory.watch() if self.runtime.watch_memory else memory.unwatched() as memories:
                # Under the instantiation lock: no other instance is being made meanwhile.
                before = anon_rss_bytes()
                instance = self._linker.instantiate(store, self.component)
                made_bytes = max(anon_rss_bytes() - before, 0)
        except wasmtime.WasmtimeError as exc:
            raise BuildError(f"{self.manifest.name}: cannot instantiate: {exc}") from None
        func = instance.get_func(store, "handle")
        if func is None:
            raise BuildError(f"{self.manifest.name}: the component exports no `handle`")
        batch, latin1 = instance.get_func(store, "handle-batch"), instance.get_func(store, "handle-latin1")
        made = _Instance(store, ExportCall(store, func), batch and ExportCall(store, batch),
                         latin1 and ExportCall(store, latin1), stderr, made_bytes=made_bytes, memories=memories)
        self._made[id(made)] = made
        with self._cond:
            self._creations = [*self._creations[-8:], made_bytes]
        return made

    def _own(self, inst: _Instance) -> int | None:
        """What the instance's own linear memories hold in RAM (`memory.private_bytes`): read for it alone,
        whatever other threads do meanwhile. None where its memories are not known (no budget, metering off)."""
        return memory.private_bytes(inst.memories, self.limits.memory_mb << 20) if inst.memories else None

    def _grown(self, inst: _Instance, anon_before: int) -> int:
        """What an instance's first call made it hold: what its own memories gained; where they cannot be
        read, what the process's own memory grew by since `anon_before` (other threads' work counts too)."""
        own = self._own(inst)
        if own is None or inst.written is None:
            return anon_rss_bytes() - anon_before
        return own - inst.written

    def _size(self, inst: _Instance) -> int | None:
        """What a warm instance holds now: what instantiating it added and what its memories gained since
        its first call (None where they cannot be read)."""
        if inst.written is None or (own := self._own(inst)) is None:
            return None
        return inst.made_bytes + max(own - inst.written, 0)

    def memory_bytes(self) -> int:
        """The linear memory of the largest instance alive now (a guest's memory never shrinks: its peak)."""
        return max(memory.sizes([inst.memories for inst in list(self._made.values())]), default=0)

    def handle(self, event: Event) -> list[Message]:
        """Run one event on a warm instance; FunctionError says why it could not be handled."""
        answer = self.handle_batch([event])[0]
        if isinstance(answer, FunctionError):
            raise answer
        return answer

    def handle_batch(self, events: list[Event], *, metered: bool = True) -> list[list[Message] | FunctionError]:
        """Run events that queued up together in as few calls as possible; one answer (messages or
        the error) each, in order. (`metered`: for the lanes' workers to say; a sandbox in this process
        is metered by its caller, `edgefn.dispatch.worker`.)

        A quarantined payload is answered `Quarantined` without running. A suspect (it failed
        before) runs alone, so it cannot spoil a batch again; the other events run in order, as
        batches between suspects (see `_bisect`)."""
        outermost = getattr(self._arrival, "ms", None) is None
        if outermost and events:  # how long its events have waited counts toward scaling up
            self._arrival.ms = min(e.received_ms for e in events)
        try:
            return self._screened(events)
        finally:
            if outermost:
                self._arrival.ms = None

    def _screened(self, events: list[Event]) -> list[list[Message] | FunctionError]:
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
        is screened again: once a culprit is struck, the events that resemble it still in the
        batch run alone (or are refused) instead of failing more halves. Where a failed call costs
        more than the calls halving would spare, the events run alone instead (`_CallCosts`). A
        stack overflow names its likely culprits, the events nested deeper than ordinary JSON:
        they run alone and the others together, with no halving (`_deep_alone`).

        An event of a failed batch runs again (as any re-run does): state updates from the failed
        call are not undone."""
        if len(events) <= 1 or not self._batches:
            return [self._one(e) for e in events]
        try:
            answers = self._call(lambda inst: _run_batch(inst, events), len(events))
        except FunctionError as exc:
            # A stack overflow points at its likely culprits: the events nested deeper than ordinary JSON.
            deep = [nesting(e.payload) is not None for e in events] if isinstance(exc, GuestStackOverflow) else []
            if any(deep):
                return self._deep_alone(events, deep)
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

    def _deep_alone(self, events: list[Event], deep: list[bool]) -> list[list[Message] | FunctionError]:
        """A batch whose stack ran out: its events nested deep (`deep`) run alone, each screened again (the
        first may teach the quarantine the fault), then the others together."""
        answers: list[list[Message] | FunctionError | None] = [None] * len(events)
        for i, event in enumerate(events):
            if deep[i]:
                answers[i] = self.handle_batch([event])[0]
        rest = [i for i, d in enumerate(deep) if not d]
        for i, answer in zip(rest, self.handle_batch([events[i] for i in rest]), strict=True):
            answers[i] = answer
        return answers  # type: ignore[return-value]  (every slot is filled)

    def _one(self, event: Event) -> list[Message] | FunctionError:
        """Run one event alone: a trap, timeout or out-of-memory here is its own, a strike against its payload."""
        try:
            return self._answer(*self._call(lambda inst: _run_one(inst, event), 1))
        except FunctionError as exc:
            if self.quarantine is not None:
                self.quarantine.strike(event.payload, exc, self.manifest.version)
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
        keep, fits, failure = True, True, None
        try:
            inst.handle.set_deadline(self._deadline_ticks * events)
            try:
                if inst.events:
                    result = call(inst)
                else:  # its first call: the guest's runtime warms up, and what it holds is measured
                    inst.written, before = self._own(inst), anon_rss_bytes()
                    result = call(inst)
                    fits = self._measured_first_call(inst, self._grown(inst, before))
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
            self._give_back(inst, keep and fits and inst.events < self.limits.recycle_after)
            if not isinstance(failure, GuestTimeout):  # it cost its deadline; a timed-out batch is never halved
                self._costs.note(time.perf_counter() - started, failed=not keep, events=events)

    def _measured_first_call(self, inst: _Instance, grown: int) -> bool:
        """What an instance's first call adds to its own memories (the guest's runtime warming up) is
        part of what it holds; what the host allocates meanwhile (a model's first run, other functions'
        calls) is not. The function's estimate is what creating one added plus what a first call adds
        (medians of the last few), or what warm ones held when released where that is more
        (`_estimate`). This instance's reservation grows
        to the estimate if the budget has room; if not, False: it is dropped after this call, so the
        budget is never exceeded."""
        with self._cond:
            self._first_calls = [*self._first_calls[-8:], max(grown, 0)]
            self._estimate()
            extra = self.instance_bytes - inst.reserved
        if extra <= 0:
            return True
        if self.budget.reserve(extra):
            inst.reserved += extra
            return True
        log.debug("%s: a warm instance does not fit the memory budget: dropped after its call", self.manifest.name)
        return False

    def _estimate(self) -> None:
        """What an instance is counted for (under `_cond`): the larger of what a new one comes to after its
        first call and what a warm one held when released (medians of the last few: the very first
        instantiation of a component also sets up what its instances share), within [1 MiB, memory_mb]."""
        def median(values: list[int]) -> int:
            return sorted(values)[len(values) // 2] if values else 0

        estimate = max(median(self._creations) + median(self._first_calls), median(self._releases))
        self.instance_bytes = min(max(estimate, _MIN_INSTANCE_BYTES), self.limits.memory_mb << 20)

    def _take(self) -> _Instance:
        """An idle instance (the warmest); else a new one, once the event has waited its share of the
        latency budget (at once with none at all), within max_instances and the memory budget; else
        wait for either. A worker waits here rather than give its events up: they are never lost."""
        arrived_ms = getattr(self._arrival, "ms", None)
        arrived = time.time() if arrived_ms is None else arrived_ms / 1000
        while True:
            found = self._idle_or_room(arrived)
            if isinstance(found, _Instance):
                return found
            started = time.perf_counter()
            try:
                inst = self._new_instance()
            except Exception:
                self._lost_one(found)
                with self._cond:
                    self._failed_at = time.monotonic()
                log.exception("%s: cannot create an instance; the event waits, tried again in 1 s", self.manifest.name)
                continue
            with self._cond:
                self.cold_starts += 1
                self.cold_start_ms = (time.perf_counter() - started) * 1000
            inst.reserved = found
            return inst

    def _idle_or_room(self, arrived: float) -> _Instance | int:
        """An idle instance, or the bytes reserved once one more may be made (it is counted already)."""
        refused = False  # said once per wait, at debug level, that the memory budget is full
        with self._cond:
            while True:
                if self._closed:
                    raise FunctionError(f"{self.manifest.name} is closed")
                if self._idle:
                    return self._idle.pop()
                waited = time.time() - arrived
                due = self._live == 0 or waited >= self._scale_after_s
                if due and self._live < self.max_instances and time.monotonic() - self._failed_at > 1.0:
                    if self.budget.reserve(nbytes := self.instance_bytes):
                        self._live += 1
                        log.debug("%s: scaling up to %d instances (an event waited %.0f ms)",
                                  self.manifest.name, self._live, waited * 1000)
                        return nbytes
                    if not refused:
                        refused = True
                        # Holding none, the function waits for other functions' instances to idle out.
                        log.log(logging.WARNING if self._live == 0 else logging.DEBUG,
                                "%s: no scale-up past %d instances: the memory budget is full (%s); its events "
                                "wait", self.manifest.name, self._live, self.budget.snapshot())
                # Woken by an instance coming back; the share, the budget and a retry are polled.
                remaining = self._scale_after_s - waited
                self._cond.wait(min(0.02, remaining) if remaining > 0.001 else 0.02)

    def _give_back(self, inst: _Instance, keep: bool) -> None:
        """An instance done with its call: back on top of the idle stack, or (trapped, recycled) dropped,
        and the pool made up to min_instances again."""
        if keep and not self._closed:
            inst.idle_since = time.monotonic()
            with self._cond:
                self._idle.append(inst)
                self._cond.notify()
            return
        inst.drop()
        self._lost_one(inst.reserved)
        self._top_up()

    def _lost_one(self, reserved: int) -> None:
        """An instance is gone (dropped, or never made): its count and its memory go back."""
        with self._cond:
            self._live -= 1
            self._cond.notify()
        self.budget.release(reserved)

    def _top_up(self) -> None:
        """Instances up to min_instances, as far as the memory budget allows (the rest on demand)."""
        while not self._closed and time.monotonic() - self._failed_at > 1.0:
            with self._cond:
                if self._live >= self.min_instances or not self.budget.reserve(nbytes := self.instance_bytes):
                    return
                self._live += 1
            try:
                inst = self._new_instance()
            except Exception:
                self._lost_one(nbytes)
                self._failed_at = time.monotonic()
                log.exception("%s: cannot create an instance; will retry", self.manifest.name)
                return
            inst.reserved = nbytes
            self._give_back(inst, keep=True)

    def keep(self, idle_s: float | None = None) -> None:
        """Release the instances idle for `idle_s` (default: the manifest's), down to min_instances (the
        pool keeper calls this)."""
        now, idle_s = time.monotonic(), self.limits.idle_s if idle_s is None else idle_s
        released: list[_Instance] = []
        with self._cond:
            while (self._live - len(released) > self.min_instances and self._idle
                   and now - self._idle[0].idle_since >= idle_s):
                released.append(self._idle.pop(0))
        if released:
            sizes = [size for inst in released if (size := self._size(inst)) is not None]
            for inst in released:
                inst.drop()
            return_freed_memory()
            for inst in released:
                self._lost_one(inst.reserved)
            with self._cond:  # what a warm instance held, measured as it goes: part of the estimate
                self._releases = [*self._releases, *sizes][-9:]
                self._estimate()
            log.debug("%s: scaled down to %d instances (%d idle for %g s)", self.manifest.name, self._live,
                      len(released), idle_s)
        if self._live < self.min_instances:
            self._top_up()

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
        """Drop the idle instances (idempotent); events still running finish on theirs, which are
        dropped when they come back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for inst in idle:
            inst.drop()
            self._lost_one(inst.reserved)

    @property
    def closed(self) -> bool:
        return self._closed
