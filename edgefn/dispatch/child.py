"""A worker process: it runs functions' batches in their sandboxes for the daemon, each on a thread.

Started by `edgefn.dispatch.processes` as `python -m edgefn.dispatch.child READ_FD WRITE_FD` with two
pipes (the daemon's `multiprocessing.connection` framing, pickled tuples). It loads every function it
is given (mapping the compiled components from the cache the daemon filled, so their code pages are
shared through the page cache) and its models, says ("ready", failed, sizes), then answers:

    ("run", id, function, events, metered)  ->  ("done", id, answers, usage, inference runs)  (or ("failed", id, why))
    ("pool", id)                   ->  ("pool", id, {function: its pool and memory}, its memory budget)

Batches run concurrently, each on a thread of its own (a slow function does not hold a neighbour's
batch; each function's instance pool is elastic here as in the daemon). A guest's `state-get` and
`state-set` are asked of the daemon over the same pipe while the batch runs (("state-get", id,
function, key) -> ("state", id, value)), so a function's state has one owner whatever worker runs it.
The process ends when its pipe closes: a daemon that dies takes its workers with it. Its logs go to
the daemon's stderr.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from edgefn.errors import EdgefnError, StorageError
from edgefn.functions.state import StateLimitError
from edgefn.observe.usage import UNMETERED

log = logging.getLogger("edgefn.worker")
PROTOCOL = pickle.HIGHEST_PROTOCOL
MAX_BATCHES = 1024  # batches running at once in one worker, far past what the lanes send


@dataclass(frozen=True)
class FunctionSpec:
    """One function a worker loads: its name, its folder (manifest, sources) and its runnable component."""

    name: str
    folder: Path
    wasm: Path
    instances: int  # the most instances it may have in this worker


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to load its functions as the daemon would."""

    settings: Any  # edgefn.config.Settings
    profile: Any  # edgefn.profiles.Profile
    model_dirs: list[Path]
    pins: dict[str, str]
    functions: list[FunctionSpec]
    memory_budget_mb: int | None
    log_level: int


def send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(pickle.dumps(message, PROTOCOL))


def receive(conn: Connection) -> tuple:
    return pickle.loads(conn.recv_bytes())


class _Pipe:
    """The worker's end: messages out under one lock (batches answer from several threads), and the
    daemon's answers to this worker's questions (state) handed to the thread that asked."""

    def __init__(self, inbound: Connection, outbound: Connection):
        self.inbound, self._out = inbound, outbound
        self._lock = threading.Lock()
        self._asked: dict[int, list] = {}  # question id -> [threading.Event, answer]
        self._ids = itertools.count()

    def send(self, message: tuple) -> None:
        with self._lock:
            send(self._out, message)

    def ask(self, *question: Any) -> tuple:
        """Ask the daemon (from a batch's thread) and wait for its answer."""
        asked = next(self._ids)
        waiting = self._asked[asked] = [threading.Event(), None]
        self.send((question[0], asked, *question[1:]))
        waiting[0].wait()
        del self._asked[asked]
        if waiting[1] is None:
            raise EOFError("the daemon went away")
        return waiting[1]

    def answered(self, asked: int, answer: tuple) -> None:
        waiting = self._asked[asked]
        waiting[1] = answer
        waiting[0].set()

    def closed(self) -> None:
        for waiting in list(self._asked.values()):
            waiting[0].set()


class _StateOverPipe:
    """The `StateStore` a worker's functions see: each get and set asked of the daemon, which owns it."""

    def __init__(self, pipe: _Pipe):
        self._pipe = pipe

    def _ask(self, *question: Any) -> Any:
        answer = self._pipe.ask(*question)
        if answer[0] == "state-error":  # the daemon's refusal (a limit, a full disk), raised here for the guest
            _, storage, why = answer
            raise StorageError(why) if storage else StateLimitError(why)
        return answer[1]

    def get(self, function: str, key: str) -> bytes | None:
        return self._ask("state-get", function, key)

    def set(self, function: str, key: str, value: bytes) -> None:
        self._ask("state-set", function, key, bytes(value))


def serve(inbound: Connection, outbound: Connection) -> None:
    """Load what the first message names, say "ready" (with what did not load), then run each batch on a
    thread of its own (as the daemon's lanes would) until the pipe closes."""
    spec: WorkerSpec = receive(inbound)[1]
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    from edgefn.dispatch.loader import make_registry  # the heavy imports (wasmtime, onnxruntime) here
    from edgefn.functions.host import FunctionHost
    from edgefn.functions.manifest import load_manifest
    from edgefn.functions.sandbox import FunctionSandbox, Runtime
    from edgefn.inference.batching import Batcher
    from edgefn.observe.metrics import Metrics

    s = spec.settings
    pipe = _Pipe(inbound, outbound)
    metrics = Metrics(metering=s.metering)
    runtime = Runtime(s.state_dir / "components", memory_budget_mb=spec.memory_budget_mb, watch_memory=s.metering)
    registry = make_registry(s, spec.profile, spec.model_dirs, spec.pins)
    state = _StateOverPipe(pipe)
    # Concurrent batches' infer calls of one model stacked into one run, as in the daemon's process.
    inferences: list[tuple[str, str, int]] = []  # each inference run's (model, where, calls): the daemon's histogram
    inferences_lock = threading.Lock()

    def ran(model: str, where: str, calls: int) -> None:
        with inferences_lock:
            inferences.append((model, where, calls))

    def runs() -> list[tuple[str, str, int]]:
        with inferences_lock:
            taken = inferences[:]
            inferences.clear()
            return taken

    batcher = Batcher(registry, None, max_calls=s.batch_max, wait_s=s.batch_wait_ms / 1000, on_batch=ran)
    sandboxes: dict[str, FunctionSandbox] = {}
    failed: dict[str, str] = {}
    for fn in spec.functions:
        try:
            manifest = load_manifest(fn.folder)
            host = FunctionHost(manifest.name, registry, state, None, "never", manifest.confidence_threshold,
                                metrics, batcher=batcher, log_lines_per_s=manifest.limits.log_lines_per_s,
                                log_bytes_per_s=manifest.limits.log_bytes_per_s)
            for model in manifest.models.use:
                registry.choice(model)  # loaded now: a missing model fails the start, not an event
            sandboxes[manifest.name] = FunctionSandbox(runtime, manifest, fn.wasm, host, max_instances=fn.instances)
        except EdgefnError as exc:
            failed[fn.name] = str(exc)
    pipe.send(("ready", failed, {name: sb.instance_bytes for name, sb in sandboxes.items()}))
    usage = metrics.usage

    def run(asked: int, name: str, events: list, metered: bool) -> None:
        sandbox = sandboxes[name]
        call = usage.call(name, events) if metered else UNMETERED  # a health check's sample: not the function's use
        try:
            answers = sandbox.handle_batch(events)
            call.done(answers)
            pipe.send(("done", asked, answers, usage.take(name), runs()))
        except Exception as exc:  # a bug of ours: said, so the daemon does not wait (it keeps the events journaled)
            log.exception("%s: a batch failed", name)
            pipe.send(("failed", asked, f"{type(exc).__name__}: {exc}"))

    # As many threads as batches come at once (made only as needed): a pool's bound would make a neighbour's
    # batch wait behind a slow function's, which is what the daemon's lanes are there to prevent.
    with ThreadPoolExecutor(max_workers=MAX_BATCHES, thread_name_prefix="edgefn-batch") as batches:
        while True:
            try:
                message = receive(inbound)
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "run":
                batches.submit(run, *message[1:])
            elif kind == "state":
                pipe.answered(message[1], message[2:])
            elif kind == "pool":
                pipe.send(("pool", message[1], {name: {**sb.pool(), "memory_bytes": sb.memory_bytes()}
                                                for name, sb in sandboxes.items()}, runtime.budget.snapshot()))
            else:
                break
        pipe.closed()
    for sandbox in sandboxes.values():
        sandbox.close()
    runtime.close()


def main() -> None:
    inbound = Connection(int(sys.argv[1]), writable=False)
    outbound = Connection(int(sys.argv[2]), readable=False)
    threading.current_thread().name = "edgefn-worker"
    try:
        serve(inbound, outbound)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the daemon went away (or stops): nothing of ours is lost, its events are journaled there


if __name__ == "__main__":
    main()
