"""The daemon: wires broker, inbox, sandboxes, models and metrics, and owns their lifecycle.

    broker --QoS1 (MQTT 5)--> Ingress.on_message -> Inbox.append_many (group commit) -> PUBACK
      -> each triggered function's queue -> its workers: FunctionSandbox.handle_batch -> host.infer
      -> ModelRegistry -> publish outputs QoS1, in arrival order per function
      -> every 50 ms, one transaction: answered events leave the inbox, their outputs still
         awaiting a PUBACK enter the outbox, acknowledged outbox rows leave it
      -> Ingress.answered (room in the inbox for held events)

After a crash the outbox is published again and the inbox replayed, so nothing is lost; a
consumer may see an output twice, and every output published again carries the MQTT 5 user
property `edgefn-duplicate: possible`. Every output carries `edgefn-event` (the event's journal id,
never reused on this device), so duplicates can be dropped without reading the payload, and
`edgefn-function` (name@version; `edgefn-release`, bundle@version, when a fleet release runs).

A fleet release is swapped in while events flow (`activate`): the new functions are loaded beside
the old, routing switches in one step, and the old lanes drain (what they hold finishes on the old
version) before their workers stop.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np

from edgefn.config import Settings
from edgefn.errors import CloudError, EdgefnError, FunctionError, PayloadTooLarge
from edgefn.events import Event, Message
from edgefn.fleet.store import FleetStore, Release
from edgefn.functions.build import discover, runnable_component
from edgefn.functions.manifest import Manifest, load_manifest
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.batching import Batcher
from edgefn.inference.delegates import chains_from_profile
from edgefn.inference.registry import ModelRegistry
from edgefn.inference.tensors import WireTensor as Tensor
from edgefn.journal.inbox import Inbox
from edgefn.mqtt.connection import POSSIBLE_DUPLICATE, Connection
from edgefn.mqtt.ingress import Ingress
from edgefn.observe.metrics import Metrics, ObserveServer
from edgefn.offload.breaker import BreakerState, CircuitBreaker
from edgefn.offload.client import CloudClient
from edgefn.offload.planner import Planner, Where
from edgefn.profiles import Pressure, Profile, detect, get_profile, pressure, read_thermal
from edgefn.profiles.sensors import MemoryState, ThermalState
from edgefn.protocol.fleet import Health
from edgefn.protocol.offload import Policy
from edgefn.topics import ERRORS_TOPIC, matches_any

if TYPE_CHECKING:
    from edgefn.fleet.agent import FleetAgent

log = logging.getLogger("edgefn.daemon")
_TICK_S = 0.005  # the longest a received event waits for its group's commit
_SETTLE_EVERY = 10  # answered events leave the inbox every 50 ms, in one transaction
_SENSORS_EVERY = 1000  # temperatures and free memory are read every 5 s
_PRESSURE_STATES = {"thermal": get_args(ThermalState), "memory": get_args(MemoryState)}


class FunctionHost:
    """The host side of one function's sandbox: its models (here or on the cloud endpoint), its state
    and its log."""

    def __init__(self, name: str, registry: ModelRegistry, state: StateStore, cloud: CloudClient | None = None,
                 policy: Policy = "never", confidence: float = 0.5, metrics: Metrics | None = None,
                 batcher: Batcher | None = None):
        self.name, self.registry, self.state = name, registry, state
        self.cloud, self.policy, self.confidence, self.metrics = cloud, policy, confidence, metrics
        # Through a batcher, concurrent calls of one model are stacked into one run (here or on the endpoint).
        self._infer_here = batcher.local if batcher is not None else registry.infer
        self._infer_there = None if cloud is None else batcher.cloud if batcher is not None else cloud.infer
        self._log = logging.getLogger(f"edgefn.fn.{name}")
        self._plan = threading.local()  # where this worker's current batch runs its inference

    def plan(self, where: Where) -> None:
        """Where the inference of the batch this worker runs next goes (the planner's decision)."""
        self._plan.where = where

    def state_get(self, key: str) -> bytes | None:
        return self.state.get(self.name, key)

    def state_set(self, key: str, value: bytes) -> None:
        self.state.set(self.name, key, value)

    def infer(self, model: str, inputs: list[Tensor]) -> tuple[list[Tensor], str]:
        if self.cloud is not None and getattr(self._plan, "where", "local") == "cloud":
            answer = self._on_cloud(model, inputs, "handed-off")
            if answer is not None:
                return answer, "cloud"
        outputs = self._infer_here(model, inputs)
        if self.cloud is not None and self.policy == "on-low-confidence" and _unsure(outputs, self.confidence):
            answer = self._on_cloud(model, inputs, "asked-again")  # joint inference: the cloud's model decides
            if answer is not None:
                return answer, "cloud"
        return outputs, "local"

    def _on_cloud(self, model: str, inputs: list[Tensor], why: str) -> list[Tensor] | None:
        """The cloud's answer, or None (breaker open, endpoint away or refusing): then it runs here."""
        assert self._infer_there is not None
        try:
            answer = self._infer_there(model, inputs)
        except CloudError as exc:
            self._count("ran-here-instead")
            self._log.debug("cloud inference of %s failed, running it here: %s", model, exc)
            return None
        self._count(why)
        return answer

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.offload.labels(self.name, outcome).inc()

    def log(self, level: int, message: str) -> None:
        self._log.log(level if level in (10, 20, 30, 40, 50) else 20, "%s", message[:4096])


def _unsure(outputs: list[Tensor], threshold: float) -> bool:
    """Whether a local answer's top score is below `threshold` for any row (the first [N, classes]
    float32 output holds the scores)."""
    for dtype, shape, data in outputs:
        if dtype == "float32" and len(shape) == 2 and shape[0] > 0 and shape[1] > 0:
            scores = np.frombuffer(data, dtype="<f4").reshape(shape)
            return bool(scores.max(axis=1).min() < threshold)
    return False


class _InOrder:
    """Publishes a function's answers in the order its events arrived, whichever of its workers
    finishes first: tickets are handed out as events are queued, and an answer waits for the
    answers of the tickets before it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued = 0
        self._next = 0
        self._ready: dict[int, Callable[[], None]] = {}

    def queue(self, into: queue.Queue, item: tuple) -> None:
        with self._lock:
            into.put((*item, self._issued))
            self._issued += 1

    def release(self, ticket: int, publish: Callable[[], None] = lambda: None) -> None:
        """Run `publish` when every ticket before this one has run; each ticket at most once."""
        with self._lock:
            if ticket < self._next or ticket in self._ready:
                return
            self._ready[ticket] = publish
            while self._next in self._ready:
                try:
                    self._ready.pop(self._next)()
                except Exception:  # a bug of ours must not stall the function's later answers
                    log.exception("publishing answer %d failed", self._next)
                self._next += 1


class HealthWindow:
    """Events, errors and latency of the functions running now, since they were activated: what the
    fleet agent reports and holds against a rollout's gate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events = self.errors = 0
        self._ms: deque[float] = deque(maxlen=4096)  # the latest latencies, for the p99

    def record(self, ok: bool, seconds: float) -> None:
        with self._lock:
            self.events += 1
            self.errors += not ok
            self._ms.append(seconds * 1000)

    def snapshot(self) -> Health:
        with self._lock:
            p99 = float(np.percentile(np.fromiter(self._ms, float), 99)) if self._ms else None
            return Health(events=self.events, errors=self.errors, p99_ms=p99)


@dataclass
class Lane:
    """A queue of a function's events, the workers that take from it, and where their inference runs.
    Answers leave a lane in the order its events came in."""

    where: Where
    workers: int
    queue: queue.Queue[tuple[Event, _Pending, int] | None] = field(default_factory=queue.Queue)
    order: _InOrder = field(default_factory=_InOrder)


@dataclass
class LoadedFunction:
    """A function, its sandbox, and its own lanes: a slow or hostile function backs up only its own
    queues, never its neighbours'. The local lane has as many workers as the function's instances;
    with a cloud endpoint, a cloud lane takes what the local one cannot serve within its latency
    budget (its workers' instances wait for the cloud's answers, not for the CPU)."""

    manifest: Manifest
    folder: Path
    sandbox: FunctionSandbox
    properties: list[tuple[str, str]]  # MQTT 5 user properties on every output
    planner: Planner
    lanes: dict[str, Lane]
    window: HealthWindow
    workers: list[threading.Thread] = field(default_factory=list)

    @property
    def local(self) -> Lane:
        return self.lanes["local"]


@dataclass(eq=False)
class _Output:
    """A message on its way to the broker; in the outbox (`row`) if its event settles first."""

    event_id: str
    message: Message
    acked: bool = False
    row: int | None = None


@dataclass
class _Pending:
    """An event until every function it went to has answered."""

    event: Event
    functions: int  # functions still working on it
    outputs: list[_Output] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self, outputs: list[_Output]) -> bool:
        """One function has answered with these outputs; True when it was the last one."""
        with self.lock:
            self.outputs += outputs
            self.functions -= 1
            return self.functions == 0


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
        # What the next settle writes, under _journal_lock: events answered, outbox rows delivered.
        self._answered: list[_Pending] = []
        self._delivered: list[int] = []
        self._awaiting_ack = 0  # outputs published and not yet acknowledged (nor refused)
        self._outbox_rows = 0
        self._journal_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._route_cache: dict[str, list[LoadedFunction]] = {}
        self._routing = threading.Lock()  # routing an event and swapping releases exclude each other
        self._swap = threading.Lock()  # one activation at a time
        self.functions: list[LoadedFunction] = []
        self.release: Release | None = None  # the fleet release running (None: --functions)
        self.window = HealthWindow()
        self.fleet = FleetStore(settings.state_dir / "fleet")
        self.fleet_problem: str | None = None  # why the release active.json named did not start
        self.observe: ObserveServer | None = None
        self.agent: FleetAgent | None = None
        self.pressure: Pressure | None = None  # the latest sensor readings against the profile's limits

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.runtime = Runtime(s.state_dir / "components")
        self.profile = self._device_profile()
        self.state = StateStore(s.state_dir / "state.sqlite")
        self.cloud = self._cloud_client()
        self._read_sensors()
        self.registry, self.functions = self._load_active()
        self.inbox = Inbox(s.state_dir / "inbox.sqlite" if s.journal == "disk" else ":memory:")
        replay, unsent = self.inbox.pending(), self.inbox.outbox()
        if replay or unsent:
            log.info("after a restart: %d answers to publish again, %d events to run again", len(unsent), len(replay))
        self._outbox_rows = len(unsent)
        filters = _filters(self.functions)
        # Ingress and the connection exist before any worker can publish (replayed events).
        self.ingress = Ingress(self.inbox, s.inbox_max_events, self._deliver, ack=lambda mid: self.connection.ack(mid),
                               more_waiting=lambda: self.connection.has_more_to_read(), outstanding=len(replay),
                               max_bytes=s.inbox_max_bytes, outstanding_bytes=sum(len(e.payload) for e in replay))
        self.connection = Connection(s, self.ingress.on_message, filters, on_disconnect=self.ingress.disconnected,
                                     subscriptions_file=s.state_dir / "subscriptions.json")
        for row, event_id, message in unsent:  # queued by paho until connected, before any new answer
            self._send(_Output(event_id, message, row=row), replayed=True)
        self._start_workers(self.functions)
        self._deliver(replay, replayed=True)
        self._spawn(self._housekeeping, "edgefn-housekeeping")
        self.connection.start()
        if s.metrics_port is not None:
            self.observe = ObserveServer(self.metrics, self.health, s.metrics_port)
        if s.fleet_url:
            from edgefn.fleet.agent import FleetAgent  # python-tuf and httpx only where a fleet is used

            self.agent = FleetAgent(self)
            self.agent.start()

    def _load_active(self) -> tuple[ModelRegistry, list[LoadedFunction]]:
        """What active.json names (docs/fleet.md), else --functions. A fleet release that no longer
        loads (a crash between recording and checking it, a file gone bad) is rolled back here: the
        previous release runs, the broken one is refused, and the agent reports why."""
        active = self.fleet.active()
        self.release = active.current
        if self.release is not None:
            log.info("fleet release %s", self.release.label)
        try:
            return self._load_release(self.release, self.window)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the device must come up on something
            if self.release is None:
                raise  # --functions: the user's to mend
            self.fleet_problem = f"{self.release.label} does not start: {exc}"
            log.error("%s; going back to %s", self.fleet_problem,
                      active.previous.label if active.previous else "the local functions")
            self.fleet.set_active(active.refusing(self.release, active.rollout, run=active.previous))
            self.fleet.end_update()
            return self._load_active()

    def _load_release(self, release: Release | None, window: HealthWindow) -> tuple[ModelRegistry, list[LoadedFunction]]:
        """A fleet release's functions and models from its unpacked bundle; None: --functions and --models."""
        if release is None:
            return self._load(self.settings.functions, self.settings.models, window)
        folder = self.fleet.bundle_dir(release)
        return self._load([folder / "functions"], [folder / "models"], window)

    def _load(self, function_dirs: list[Path], model_dirs: list[Path],
              window: HealthWindow) -> tuple[ModelRegistry, list[LoadedFunction]]:
        """The functions under `function_dirs` with their models, loaded and ready (workers not started)."""
        s = self.settings
        registry = ModelRegistry(
            model_dirs, variants=s.model_variants if self.release is None else _pins_for(s.model_variants, model_dirs),
            on_load=lambda c: self.metrics.set_model_variant(c.model, c.variant, c.format, c.delegate),
            chains=chains_from_profile(self.profile, s.state_dir), precisions=self.profile.variant_preference,
            search=s.delegate_dirs)
        batcher = Batcher(registry, self.cloud, max_calls=s.batch_max, wait_s=s.batch_wait_ms / 1000,
                          on_batch=self.metrics.observe_inference_batch)
        functions: list[LoadedFunction] = []
        try:
            for folder in self._function_folders(function_dirs):
                functions.append(self._load_function(folder, registry, batcher, window))
        except BaseException:
            for fn in functions:
                fn.sandbox.close()
            raise
        return registry, functions

    def _function_folders(self, paths: list[Path]) -> list[Path]:
        """The function folders under `paths`; none for a fleet device without local functions of its own,
        which runs nothing until the fleet assigns it a release."""
        if self.release is None and self.settings.fleet_only:
            log.info("no local functions: waiting for a release from the fleet")
            return []
        return discover(paths)

    def _load_function(self, folder: Path, registry: ModelRegistry, batcher: Batcher,
                       window: HealthWindow) -> LoadedFunction:
        s = self.settings
        manifest = load_manifest(folder)
        wasm = runnable_component(folder, manifest)
        if not wasm.exists():
            raise EdgefnError(f"{folder}: not built yet (run: edgefn fn build {folder})")
        policy = self._policy(manifest)
        host = FunctionHost(manifest.name, registry, self.state, self.cloud, policy,
                            manifest.confidence_threshold, self.metrics, batcher=batcher)
        # Load now: a missing model fails the start, not an event. What each runs as goes out
        # with every output of the function (user property edgefn-models).
        choices = [registry.choice(model) for model in manifest.models.use]
        models = ",".join(f"{c.model}={c.variant}/{c.format}/{c.delegate}" for c in choices)
        properties = [("edgefn-function", f"{manifest.name}@{manifest.version}")]
        if self.release is not None:
            properties.append(("edgefn-release", self.release.label))
        if models:
            properties.append(("edgefn-models", models))
        # `always`: the function's own lane hands every batch off; `on-overload`: a cloud lane of its own.
        lanes = {"local": Lane("cloud" if policy == "always" else "local", manifest.limits.instances)}
        if policy == "on-overload" and s.cloud_workers:
            lanes["cloud"] = Lane("cloud", s.cloud_workers)
        sandbox = FunctionSandbox(self.runtime, manifest, wasm, host,
                                  instances=sum(lane.workers for lane in lanes.values()))
        planner = Planner(policy, manifest.latency_budget_ms, manifest.limits.instances,
                          cloud_workers=s.cloud_workers or 1)
        log.info("function %s %s from %s", manifest.name, manifest.version, folder)
        return LoadedFunction(manifest, folder, sandbox, properties, planner, lanes, window)

    def _start_workers(self, functions: list[LoadedFunction]) -> None:
        for fn in functions:
            for lane in fn.lanes.values():
                for i in range(lane.workers):
                    fn.workers.append(self._spawn(lambda fn=fn, lane=lane: self._work_loop(fn, lane),
                                                  f"edgefn-{fn.manifest.name}-{lane.where}-{i}"))

    # -- fleet releases --------------------------------------------------------------------------------
    def activate(self, release: Release | None, drain_timeout: float = 60.0) -> None:
        """Run `release` (None: the --functions again) instead of what runs now, while events flow.

        The new functions are loaded first (a release that cannot load raises here, and the old one
        keeps running); then routing switches in one step; then the old lanes drain: events already
        queued there finish on the old version and are published, in order, before the old workers
        stop, the old sandboxes close and the new workers start."""
        with self._swap:
            window = HealthWindow()
            previous_release, self.release = self.release, release
            try:
                registry, functions = self._load_release(release, window)
            except BaseException:
                self.release = previous_release
                raise
            with self._routing:
                old, self.functions = self.functions, functions
                self.registry, self.window = registry, window
                self._route_cache = {}
            self.connection.set_filters(_filters(functions))
            log.info("activated %s", release.label if release else "the local functions")
            # The new workers start once the old lanes are empty: a function's answers leave in the order
            # its events came, across the swap too (new events wait in the new lanes meanwhile).
            self._retire(old, functions, drain_timeout)
            self._start_workers(functions)

    def _retire(self, old: list[LoadedFunction], new: list[LoadedFunction], drain_timeout: float) -> None:
        """Let the old lanes finish what they hold, then stop their workers and close their sandboxes.
        Past the deadline (a function stuck on every event), what is still queued moves to the new
        function of the same name, or is answered with nothing where the new release has none."""
        deadline = time.monotonic() + drain_timeout
        lanes = [(fn, lane) for fn in old for lane in fn.lanes.values()]
        while any(lane.queue.unfinished_tasks for _, lane in lanes):
            if time.monotonic() > deadline:
                log.error("old functions still busy after %.0f s: their queued events go to the new ones",
                          drain_timeout)
                self._hand_over(lanes, {fn.manifest.name: fn for fn in new})
                break
            time.sleep(0.01)
        for _, lane in lanes:
            lane.queue.put(None)  # each worker that takes it puts it back for the next
        for fn in old:
            for thread in fn.workers:
                thread.join()  # a call in a sandbox ends within the function's timeout_ms
            self._threads = [t for t in self._threads if t not in fn.workers]
            fn.sandbox.close()

    def _hand_over(self, lanes: list[tuple[LoadedFunction, Lane]], new: dict[str, LoadedFunction]) -> None:
        for fn, lane in lanes:
            while True:
                try:
                    item = lane.queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    event, pending, ticket = item
                    lane.order.release(ticket)  # its place in the old order: given up, nothing published
                    successor = new.get(fn.manifest.name)
                    if successor is not None:
                        successor.local.order.queue(successor.local.queue, (event, pending))
                    else:
                        self._publish(pending, [], fn.properties)
                lane.queue.task_done()

    def run_sample(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """What the functions running now answer to one event, outside the journal and the broker
        (a release's health check): their outputs, errors as messages on edgefn/errors/..."""
        event = Event(f"health-{time.monotonic_ns()}", topic, payload, time.time() * 1000)
        outputs: list[tuple[str, bytes]] = []
        for fn in self._route(topic):
            answer = fn.sandbox.handle_batch([event])[0]
            if isinstance(answer, FunctionError):
                answer = [error_message(fn.manifest, event, answer)]
            outputs += [(m.topic, m.payload) for m in answer]
        return outputs

    def _cloud_client(self) -> CloudClient | None:
        s = self.settings
        if not s.cloud_url:
            return None
        breaker = CircuitBreaker(cooldown_s=s.cloud_cooldown_s, on_change=lambda _old, new: self._breaker_state(new))
        client = CloudClient(s.cloud_url, model_map=s.cloud_model_map, auth_header=s.cloud_auth_header,
                             auth_env=s.cloud_auth_env, timeout_s=s.cloud_timeout_s, retries=s.cloud_retries,
                             breaker=breaker)
        self._breaker_state(breaker.state)
        log.info("cloud endpoint %s", client.url)
        return client

    def _breaker_state(self, state: BreakerState) -> None:
        for value in BreakerState:
            self.metrics.breaker.labels(value.value).set(1 if value == state else 0)
        if state != BreakerState.CLOSED:
            log.warning("cloud endpoint circuit breaker %s: inference runs here", state.value)

    def _policy(self, manifest: Manifest) -> Policy:
        """--offload, else the manifest's, else on-overload where an endpoint is configured."""
        policy = self.settings.offload or manifest.offload or ("on-overload" if self.cloud else "never")
        if self.cloud is None and policy != "never":
            log.warning("%s: offload %s needs a cloud endpoint (--cloud); everything runs here",
                        manifest.name, policy)
            return "never"
        return policy

    def _device_profile(self) -> Profile:
        """--profile, else what the device's /proc, /etc and /dev say it is."""
        if self.settings.profile:
            profile = get_profile(self.settings.profile)
            log.info("device profile %s (chosen with --profile)", profile.name)
        else:
            found = detect(self.settings.device_root)
            profile = found.profile
            log.info("device profile %s (detected%s): %s", profile.name, ", a fallback" if found.fallback else "",
                     "; ".join(found.evidence))
        self.metrics.profile.labels(profile.name).set(1)
        return profile

    def _under_pressure(self) -> bool:
        now = self.pressure
        return now is not None and (now.thermal == "critical" or now.memory == "low")

    def _read_sensors(self) -> None:
        zones = read_thermal(self.settings.device_root)
        now = pressure(self.profile, self.settings.device_root, zones)
        for zone in zones:
            self.metrics.temperature.labels(zone.type).set(zone.celsius)
        if now.mem is not None:
            self.metrics.memory_available.set(now.mem.available_mb * 1024 * 1024)
        for kind, state in (("thermal", now.thermal), ("memory", now.memory)):
            for value in _PRESSURE_STATES[kind]:
                self.metrics.pressure.labels(kind, value).set(1 if state == value else 0)
        self.pressure = now

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

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
            "outbox_messages": self._outbox_rows,
            "profile": self.profile.name,
            "pressure": {"thermal": self.pressure.thermal, "memory": self.pressure.memory,
                         "reasons": self.pressure.reasons} if self.pressure else None,
            "held_unacknowledged": self.ingress.held,
            "functions": {f.manifest.name: f.manifest.version for f in self.functions},
            "release": self.release.label if self.release else None,
            "models": {name: self._model_status(name) for name in self._models_in_use()},
        }

    def _model_status(self, name: str) -> dict:
        choice = self.registry.choice(name)
        return {"variant": choice.variant, "format": choice.format, "delegate": choice.delegate,
                "passed_over": [list(p) for p in choice.passed_over]}

    def _models_in_use(self) -> list[str]:
        return sorted({m for f in self.functions for m in f.manifest.models.use})

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop taking events, finish those in hand (within the deadline), then close."""
        if self._stopping.is_set():
            return
        if self.agent is not None:
            self.agent.stop()
        self._swap.acquire()  # an activation in progress finishes first; none starts after this
        self.ingress.close()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (any(lane.queue.unfinished_tasks for lane in self._lanes())
                                               or self._unfinished()):
            time.sleep(0.01)
        self._stopping.set()
        for fn in self.functions:
            for lane in fn.lanes.values():
                lane.queue.put(None)  # each worker that takes it puts it back for the next
        for thread in self._threads:
            thread.join(timeout=2)
        self._settle()  # what the broker has not acknowledged yet waits in the outbox
        self.connection.stop()
        if self.observe:
            self.observe.close()
        for f in self.functions:
            f.sandbox.close()
        self.runtime.close()
        if self.cloud is not None:
            self.cloud.close()
        self.inbox.close()
        self.state.close()

    def _unfinished(self) -> bool:
        """Events not answered yet, or (while the broker is there to take them) answers unacknowledged."""
        with self._journal_lock:
            unanswered = self.ingress.outstanding - len(self._answered) > 0
            return unanswered or (self._awaiting_ack > 0 and self.connected)

    def _deliver(self, events: list[Event], replayed: bool = False) -> None:
        """Hand journaled events to the queue of each function they trigger."""
        if not replayed:
            self.metrics.events_received.inc(len(events))
        with self._routing:  # an event goes wholly to the old release's functions or wholly to the new's
            for event in events:
                routes = self._route(event.topic)
                pending = _Pending(event, len(routes))
                if not routes:
                    with self._journal_lock:
                        self._answered.append(pending)
                for fn in routes:
                    cloud = fn.lanes.get("cloud")
                    where = fn.planner.admit(fn.local.queue.qsize(), self._under_pressure(),
                                             cloud.queue.qsize() if cloud is not None else 0)
                    lane = fn.lanes.get(where, fn.local)
                    lane.order.queue(lane.queue, (event, pending))

    def _route(self, topic: str) -> list[LoadedFunction]:
        hit = self._route_cache.get(topic)
        if hit is None:
            hit = [f for f in self.functions if matches_any(topic, f.manifest.trigger.topics)]
            if len(self._route_cache) > 10_000:
                self._route_cache.clear()
            self._route_cache[topic] = hit
        return hit

    # -- work (each function's own workers) ------------------------------------------------------------
    def _lanes(self) -> list[Lane]:
        return [lane for fn in self.functions for lane in fn.lanes.values()]

    def _work_loop(self, fn: LoadedFunction, lane: Lane) -> None:
        while True:
            batch = self._take(fn, lane.queue)
            if batch is None:
                return
            try:
                self._process(fn, lane, batch)
            except Exception:  # a bug of ours must not kill the worker; the events stay journaled
                log.exception("%s: events %s could not be processed", fn.manifest.name, [e.id for e, _, _ in batch])
                for _, _, ticket in batch:
                    lane.order.release(ticket)  # unanswered: they run again after a restart
            finally:
                for _ in batch:
                    lane.queue.task_done()

    def _take(self, fn: LoadedFunction, q: queue.Queue) -> list[tuple[Event, _Pending, int]] | None:
        """The lane's next event and what queued up behind it (up to max_batch); None: stop."""
        first = q.get()
        if first is None:
            q.task_done()
            q.put(None)  # for the lane's next worker
            return None
        batch = [first]
        while len(batch) < fn.manifest.limits.max_batch:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                q.task_done()
                q.put(None)  # this worker stops after its batch, the next one too
                break
            batch.append(item)
        return batch

    def _process(self, fn: LoadedFunction, lane: Lane, batch: list[tuple[Event, _Pending, int]]) -> None:
        limit = self.settings.max_payload_bytes
        events = [e for e, _, _ in batch if len(e.payload) <= limit]
        answers: dict[str, list[Message] | FunctionError] = {
            e.id: PayloadTooLarge(f"payload of {len(e.payload)} bytes exceeds max_payload_bytes ({limit})")
            for e, _, _ in batch if len(e.payload) > limit}  # refused before it costs the sandbox anything
        if events:
            self.metrics.batch_events.labels(fn.manifest.name).observe(len(events))
            fn.sandbox.host.plan(lane.where)
            started = time.perf_counter()
            answers.update(zip((e.id for e in events), fn.sandbox.handle_batch(events), strict=True))
            took = time.perf_counter() - started
            if lane.where == "local":
                fn.planner.served_here(len(events), took)
            else:
                fn.planner.served_on_cloud(len(events), took)
        for event, pending, ticket in batch:
            outputs = self._outputs(fn, event, answers[event.id])
            lane.order.release(ticket, lambda p=pending, o=outputs: self._publish(p, o, fn.properties))

    def _outputs(self, fn: LoadedFunction, event: Event, answer: list[Message] | FunctionError) -> list[Message]:
        """The messages an answer publishes (its results, or its error), with the metrics."""
        name = fn.manifest.name
        took = max(0.0, time.time() - event.received_ms / 1000)
        if not event.replayed:  # an event journaled before a restart would count its downtime as latency
            # An oversized payload is the sender's fault, not the release's.
            fn.window.record(not isinstance(answer, FunctionError) or isinstance(answer, PayloadTooLarge), took)
        if isinstance(answer, FunctionError):
            log.warning("%s: event %s: %s: %s", name, event.id, answer.reason, answer)
            self.metrics.events_handled.labels(name, answer.reason).inc()
            answer = [error_message(fn.manifest, event, answer)]
        else:
            self.metrics.events_handled.labels(name, "ok").inc()
        self.metrics.event_seconds.labels(name).observe(took)
        return answer

    def _publish(self, pending: _Pending, messages: list[Message], properties: list[tuple[str, str]]) -> None:
        outputs = [_Output(pending.event.id, m) for m in messages]
        for out in outputs:
            self._send(out, pending.event.replayed, properties)
        if pending.answered(outputs):
            with self._journal_lock:
                self._answered.append(pending)

    def _send(self, out: _Output, replayed: bool, properties: list[tuple[str, str]] = ()) -> None:
        props = [("edgefn-event", out.event_id), *properties]
        if replayed:
            props.append(POSSIBLE_DUPLICATE)
        with self._journal_lock:
            self._awaiting_ack += 1
        try:
            self.connection.publish(out.message.topic, out.message.payload, lambda r: self._acked(out, r), props)
        except Exception:  # kept: it waits in the outbox and is published again after a restart
            log.exception("event %s: could not publish to %r", out.event_id, out.message.topic)
            self._acked(out, "not published")

    def _acked(self, out: _Output, refused: str | None) -> None:
        with self._journal_lock:
            self._awaiting_ack -= 1
            if refused is None:
                out.acked = True
                if out.row is not None:
                    self._delivered.append(out.row)
        if refused is None:
            self.metrics.messages_published.inc()
        else:
            # The broker said no (not authorized, quota, too large): the output stays in the
            # outbox, to be published again after a restart, rather than counted as delivered.
            self.metrics.messages_refused.inc()
            log.error("event %s: the message on %r was not delivered: %s", out.event_id, out.message.topic, refused)

    # -- housekeeping --------------------------------------------------------------------------------
    def _settle(self) -> None:
        """One transaction: answered events leave the inbox, their unacknowledged outputs enter the
        outbox, and outbox rows acknowledged since the last settle leave it."""
        with self._journal_lock:
            answered, self._answered = self._answered, []
            delivered, self._delivered = self._delivered, []
            undelivered = [out for p in answered for out in p.outputs if not out.acked]
        if not answered and not delivered:
            return
        try:
            rows = self.inbox.settle([p.event.id for p in answered],
                                     [(out.event_id, out.message) for out in undelivered], delivered)
        except Exception:
            with self._journal_lock:  # try again next time
                self._answered[:0] = answered
                self._delivered[:0] = delivered
            raise
        with self._journal_lock:
            for out, row in zip(undelivered, rows, strict=True):
                out.row = row
                if out.acked:  # acknowledged while the transaction ran
                    self._delivered.append(row)
            self._outbox_rows += len(rows) - len(delivered)
        self.ingress.answered(len(answered), sum(len(p.event.payload) for p in answered))

    def _housekeeping(self) -> None:
        tick = 0
        while not self._stopping.wait(_TICK_S):
            try:
                self.ingress.flush()  # a group left behind by a non-event packet
                tick += 1
                if tick % _SENSORS_EVERY == 0:
                    self._read_sensors()
                if tick % _SETTLE_EVERY == 0:
                    self._settle()
                    self.metrics.inbox_depth.set(self.ingress.outstanding)
                    self.metrics.outbox_depth.set(self._outbox_rows)
                    self.metrics.broker_connected.set(1 if self.connected else 0)
            except Exception:  # e.g. the disk is full: keep trying, loudly
                log.exception("housekeeping failed; retrying")
                time.sleep(0.5)


def _filters(functions: list[LoadedFunction]) -> list[str]:
    """The topic filters the daemon subscribes to for these functions."""
    return sorted({t for f in functions for t in f.manifest.trigger.topics})


def _pins_for(pins: dict[str, str], model_dirs: list[Path]) -> dict[str, str]:
    """The --model-variant pins that name a model a release ships (a release may not ship them all)."""
    shipped = {meta.parent.name for d in model_dirs for meta in Path(d).glob("*/model.json")}
    return {model: variant for model, variant in pins.items() if model in shipped}
