"""Functions on every core: worker processes that run the batches the daemon's lanes take.

The daemon's own process keeps the broker sessions, the journal, routing, the lanes and the way out
(intake); the sandboxes and their models run in `workers` processes of their own
(`edgefn.dispatch.child`), so a function's work never holds intake's interpreter, and each worker
has a core. Each worker loads every function it may be given; compiled components are mapped from
the daemon's cache, so their code is shared through the page cache, not copied per worker.

    lane worker thread --("run", function, events)--> a free worker process --("done", answers)--> the lane

Which worker: any free one, most urgent batch first (priority class, then arrival); a function that
keeps order (`[trigger] ordered`) always runs on the same worker, one batch at a time. A function's
state (`state-get`/`state-set`) stays in the daemon, asked over the pipe while the batch runs, so it is
one store whichever worker runs the function.

A worker that dies (killed, out of memory, a crash in native code) or stops answering loses nothing:
the batch's events are still journaled and unanswered. The worker is started again and the batch run
once more; a batch that kills it again is split in halves until the event that kills it is found,
which is answered on the error topic with reason `worker-crashed`.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import edgefn
from edgefn.dispatch.child import FunctionSpec, WorkerSpec, receive, send
from edgefn.errors import EdgefnError, FunctionError, NotLoaded, StorageError, WorkerCrashed
from edgefn.events import Event, Message
from edgefn.functions.manifest import Manifest
from edgefn.functions.state import StateLimitError, StateStore
from edgefn.observe.usage import Usage

log = logging.getLogger("edgefn.dispatch")
START_TIMEOUT_S = 120.0  # loading every function and model in a fresh process (a small board, a cold cache)
ANSWER_SLACK_S = 30.0  # past its events' deadlines, what a batch may take before its worker is called hung
Answer = list[Message] | FunctionError


def default_workers() -> int:
    """The cores this process may use, less one for intake (at least one worker)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _child_env() -> dict[str, str]:
    """The environment of a worker: the daemon's, with this very `edgefn` first on the import path."""
    env = dict(os.environ)
    here = str(Path(edgefn.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


class _Died(Exception):
    """A worker process went away (or stopped answering) during a call."""


class _Call:
    """A batch (or a question) sent to a worker, until its answer comes."""

    __slots__ = ("done", "answer")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: tuple | None = None  # None once done: the worker died


class _Worker:
    """One worker process, the two pipes to it, and the thread that reads its answers."""

    def __init__(self, index: int, spec: WorkerSpec, state: StateStore):
        self.index, self._state = index, state
        self.ran: set[str] = set()  # the functions it has run batches of
        self.loaded: tuple[dict[str, str], dict[str, int]] | None = None  # once ready: what `ready` returns
        self.running = 0  # batches sent and not answered (guarded by WorkerProcesses._lock)
        self._ready = threading.Event()
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self.dead = False
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgefn.dispatch.child", str(down_r), str(up_w)],
                                         pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL, env=_child_env())
        except OSError as exc:
            for fd in (down_r, down_w, up_r, up_w):
                os.close(fd)
            raise EdgefnError(f"cannot start a worker process: {exc}") from None
        os.close(down_r)
        os.close(up_w)
        self._to, self._from = Connection(down_w, readable=False), Connection(up_r, writable=False)
        self._send(("load", spec))
        self._reader = threading.Thread(target=self._read, name=f"edgefn-worker-{index}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                send(self._to, message)
        except OSError:
            self._died()  # what waits on it hears so

    def _read(self) -> None:
        """Answers from the worker, each to whoever waits for it; the guests' state questions answered here."""
        try:
            while True:
                message = receive(self._from)
                kind = message[0]
                if kind == "ready":
                    self.loaded = message[1], message[2]
                    self._ready.set()
                elif kind in ("state-get", "state-set"):
                    self._answer_state(message)
                else:
                    call = self._calls.pop(message[1], None)
                    if call is not None:
                        call.answer = message
                        call.done.set()
        except (EOFError, OSError):
            self._died()

    def _died(self) -> None:
        self.dead = True
        self._ready.set()
        for call in list(self._calls.values()):
            call.done.set()

    def _answer_state(self, message: tuple) -> None:
        kind, asked, function, key, *value = message
        try:
            if kind == "state-get":
                self._send(("state", asked, "state", self._state.get(function, key)))
            else:
                self._state.set(function, key, value[0])
                self._send(("state", asked, "state", None))
        except StateLimitError as exc:
            self._send(("state", asked, "state-error", False, str(exc)))
        except StorageError as exc:
            self._send(("state", asked, "state-error", True, str(exc)))

    def ready(self) -> tuple[dict[str, str], dict[str, int]]:
        """Wait until the process has loaded its functions: (what did not load, each loaded function's
        instance size)."""
        if not self._ready.wait(START_TIMEOUT_S) or self.loaded is None:
            why = "it exited" if self.dead else f"not ready within {START_TIMEOUT_S:.0f} s"
            self.stop(wait_s=0)
            raise EdgefnError(f"worker process {self.index} did not start: {why}")
        return self.loaded

    def ask(self, question: tuple, within_s: float) -> tuple:
        """Send a batch or a question and wait for its answer (the worker's reader hands it over)."""
        asked = next(self._ids)
        call = self._calls[asked] = _Call()
        self._send((question[0], asked, *question[1:]))
        if self.dead:
            self._calls.pop(asked, None)
            raise _Died("it exited")
        if not call.done.wait(within_s):
            self._calls.pop(asked, None)
            raise _Died(f"no answer within {within_s:.0f} s")
        if call.answer is None:
            raise _Died("it exited")
        return call.answer

    def stop(self, wait_s: float = 2.0) -> None:
        """Close its pipes (it exits when it reads the end), then kill it if it has not."""
        self._to.close()
        # Its end is the end of its pipe to us (the reader hears it). Not Popen.wait(timeout): that polls
        # with time.sleep, which fails on a device whose wall clock is being faked or stepped.
        self._reader.join(wait_s)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._from.close()


class WorkerProcesses:
    """The worker processes of one release's functions: started together; each batch goes to the least
    busy one (a function that keeps order: always the same one)."""

    def __init__(self, count: int, spec: WorkerSpec, state: StateStore, usage: Usage,
                 on_batch: Callable[[str, str, int], None] = lambda model, where, calls: None):
        self.count = count
        self._spec, self._state, self._usage, self._on_batch = spec, state, usage, on_batch
        self._workers: list[_Worker] = []
        self._restarting = [threading.Lock() for _ in range(count)]
        self._lock = threading.Lock()  # guards each worker's `running`
        self._timeouts: dict[str, float] = {}
        self._users = 0
        self.restarts = 0
        self.instance_bytes: dict[str, int] = {}
        self.failed: dict[str, str] = {}  # functions that did not load in the workers, name -> why

    def add(self, manifest: Manifest, folder: Path, wasm: Path) -> None:
        """A function the workers load when they start."""
        self._spec.functions.append(FunctionSpec(manifest.name, folder, wasm, manifest.limits.instance_bounds[1]))
        self._timeouts[manifest.name] = manifest.limits.timeout_ms / 1000
        self._users += 1

    def start(self) -> None:
        """Start every worker; they load their functions meanwhile (`ready`)."""
        try:
            for i in range(self.count):
                self._workers.append(_Worker(i, self._spec, self._state))
        except EdgefnError:
            self.close()
            raise
        log.info("%d worker processes (pids %s) loading %d functions", self.count,
                 ", ".join(str(w.pid) for w in self._workers), len(self._spec.functions))

    def ready(self) -> dict[str, str]:
        """Wait until every worker has loaded its functions; those that did not load, name -> why."""
        try:
            for worker in self._workers:
                self._booked(*worker.ready())
        except EdgefnError:
            self.close()
            raise
        return dict(self.failed)

    def _booked(self, failed: dict[str, str], sizes: dict[str, int]) -> None:
        """What a worker said it loaded; a function that did not load there is said once."""
        for name, why in failed.items():
            if name not in self.failed:
                log.error("function %s does not load in a worker process; its events are answered on its error "
                          "topic: %s", name, why)
                self.failed[name] = why
        self.instance_bytes.update(sizes)

    def pin(self, function: str) -> int:
        """The one worker an ordered function runs on."""
        return zlib.crc32(function.encode()) % self.count

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def run(self, function: str, events: list[Event], pin: int | None, metered: bool = True) -> list[Answer]:
        """Run a batch of `function` on a worker (`pin`: that one): one answer per event; `metered`: its
        guest call counted in the function's usage."""
        return self._on(function, events, pin, metered, retried=False)

    def _pick(self, pin: int | None) -> _Worker:
        with self._lock:
            worker = self._workers[pin] if pin is not None else min(self._workers, key=lambda w: w.running)
            worker.running += 1
            return worker

    def _on(self, function: str, events: list[Event], pin: int | None, metered: bool, retried: bool) -> list[Answer]:
        worker = self._pick(pin)
        try:
            if worker.loaded is None:  # its first batch: intake ran while it loaded
                try:
                    self._booked(*worker.ready())
                except EdgefnError:  # it died loading: not this batch's doing; the next batch finds a new one
                    self._restart(worker)
                    raise
            if function in self.failed:
                return [NotLoaded(f"function {function} does not load: {self.failed[function]}")] * len(events)
            within = len(events) * self._timeouts[function] + ANSWER_SLACK_S
            answer = worker.ask(("run", function, events, metered), within)
        except _Died as exc:
            pin = worker.index
            log.error("worker process %d (pid %s) died running %d events of %s (%s)", worker.index, worker.pid,
                      len(events), function, exc)
            self._restart(worker)
            if not retried:  # once more as it was: what killed it may not have been this batch
                return self._on(function, events, pin, metered, retried=True)
            if len(events) == 1:
                return [WorkerCrashed(f"the event killed its worker process twice ({exc})")]
            half = len(events) // 2
            return (self._on(function, events[:half], pin, metered, retried=True)
                    + self._on(function, events[half:], pin, metered, retried=True))
        finally:
            with self._lock:
                worker.running -= 1
        if answer[0] == "failed":
            raise EdgefnError(f"worker process {worker.index}: {answer[2]}")
        _, _, answers, usage, runs = answer
        worker.ran.add(function)
        self._usage.add(function, usage)
        for model, where, calls in runs:  # the inference batches it ran, into this process's histogram
            self._on_batch(model, where, calls)
        return answers

    def _restart(self, dead: _Worker) -> None:
        """A new process in a dead one's place (once, whoever of its callers comes first)."""
        with self._restarting[dead.index]:
            if self._workers[dead.index] is not dead:
                return
            dead.stop(wait_s=0)
            self._workers[dead.index] = _Worker(dead.index, self._spec, self._state)
            self.restarts += 1
            log.warning("worker process %d started again (pid %d)", dead.index, self._workers[dead.index].pid)

    def _pools(self) -> list[tuple[dict[str, dict], dict]]:
        """Each live worker's pools and memory budget, asked now."""
        pools = []
        for worker in list(self._workers):
            if worker.loaded is None or worker.dead:
                continue
            try:
                pools.append(worker.ask(("pool",), 5.0)[2:])
            except _Died:
                continue
        return pools

    def pool(self, function: str) -> dict[str, float | int]:
        """The function's instances over all workers, for /healthz."""
        pools = [p[function] for p, _ in self._pools() if function in p]
        least, most = (pools[0]["min"], pools[0]["max"]) if pools else (0, 0)
        return {"workers": self.count, "instances": sum(int(p["instances"]) for p in pools),
                "idle": sum(int(p["idle"]) for p in pools), "min": least, "max": most,
                "instance_mb": round(self.instance_bytes.get(function, 0) / 2**20, 1),
                "cold_starts": sum(int(p["cold_starts"]) for p in pools), "worker_restarts": self.restarts}

    def budget(self) -> dict[str, float | None]:
        """The memory budgets of the workers together (each holds its share of the device's)."""
        budgets = [b for _, b in self._pools()]
        total = [b["budget_mb"] for b in budgets]
        return {"budget_mb": None if None in total or not total else sum(total),
                "used_mb": round(sum(b["used_mb"] for b in budgets), 1),
                "peak_mb": round(sum(b["peak_mb"] for b in budgets), 1)}

    def memory_bytes(self, function: str) -> int:
        """The linear memory of the function's largest instance in any worker (read there: a map read)."""
        return max((int(p[function]["memory_bytes"]) for p, _ in self._pools() if function in p), default=0)

    def release(self) -> None:
        """One function of these workers is closed; the last one stops them."""
        self._users -= 1
        if self._users <= 0:
            self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()


class _Planless:
    """The host face a lane's worker sets the plan on: a function in worker processes runs its inference
    there (policy never: no cloud lane)."""

    @staticmethod
    def plan(where: str) -> None:
        pass


class RemoteSandbox:
    """A function that runs in the worker processes, as dispatch sees a `FunctionSandbox`."""

    meters_itself = True  # each worker meters its calls; the daemon books what they measured

    def __init__(self, processes: WorkerProcesses, manifest: Manifest, ordered: bool):
        self.manifest, self.host = manifest, _Planless()
        self._processes = processes
        self._pin = processes.pin(manifest.name) if ordered else None
        self._closed = False

    def handle_batch(self, events: list[Event], *, metered: bool = True) -> list[Answer]:
        return self._processes.run(self.manifest.name, events, self._pin, metered)

    def handle(self, event: Event) -> list[Message]:
        answer = self.handle_batch([event])[0]
        if isinstance(answer, FunctionError):
            raise answer
        return answer

    @property
    def instance_bytes(self) -> int:
        return self._processes.instance_bytes.get(self.manifest.name, 0)

    @property
    def instances(self) -> int:
        return int(self.pool()["instances"])

    @property
    def cold_starts(self) -> int:
        return int(self.pool()["cold_starts"])

    def pool(self) -> dict[str, float | int]:
        return self._processes.pool(self.manifest.name)

    def memory_bytes(self) -> int:
        return self._processes.memory_bytes(self.manifest.name)

    def budget(self) -> dict[str, float | None]:
        return self._processes.budget()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._processes.release()

    @property
    def closed(self) -> bool:
        return self._closed
