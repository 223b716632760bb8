"""The daemon: wires broker, journal, dispatch, sandboxes, models and metrics, and owns their lifecycle.

    broker --QoS1 (MQTT 5)--> Ingress.on_message -> Inbox.append_many (group commit) -> PUBACK
      -> Router.deliver: each triggered function's lane (none: Unrouted, on edgefn/errors/unrouted)
      -> its Workers: FunctionSandbox.handle_batch
      -> host.infer -> ModelRegistry -> InOrder (arrival order per lane) -> Outbox.answer: publish QoS1
      -> every 50 ms, Outbox.settle: answered events leave the inbox, their outputs still awaiting a
         PUBACK enter the outbox, acknowledged outbox rows leave it -> Ingress.answered (room for held events)

docs/architecture.md draws the parts and who may import whom. After a crash the outbox is published
again and the inbox replayed, so nothing is lost; outputs carry the user properties of
`edgefn.protocol.outputs` so consumers can drop repeats.

A fleet release is swapped in while events flow (`activate`): the new functions are loaded beside
the old, routing switches in one step, and the old lanes drain (what they hold finishes on the old
version) before their workers stop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edgefn.config import Settings
from edgefn.dispatch.lanes import LoadedFunction, busy, retire, stop_workers
from edgefn.dispatch.loader import Loader
from edgefn.dispatch.overflow import Overflow
from edgefn.dispatch.processes import RemoteSandbox
from edgefn.dispatch.router import Router
from edgefn.dispatch.unrouted import Unrouted
from edgefn.dispatch.worker import Workers, error_message
from edgefn.errors import FunctionError, StorageError
from edgefn.events import Event
from edgefn.fleet.store import FleetStore, Release
from edgefn.functions.sandbox import Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from edgefn.journal.inbox import Inbox
from edgefn.journal.outbox import Outbox
from edgefn.mqtt.connection import Connection
from edgefn.mqtt.ingress import Ingress
from edgefn.observe.deliveries import Deliveries
from edgefn.observe.device import Sensors, device_profile
from edgefn.observe.logs import Every
from edgefn.observe.metrics import Metrics, ObserveServer
from edgefn.observe.refusals import BrokerRefusals
from edgefn.observe.window import HealthWindow
from edgefn.protocol.fleet import Health
from edgefn.service.notify import Notifier
from edgefn.topics import ERRORS_TOPIC

if TYPE_CHECKING:
    from edgefn.fleet.agent import FleetAgent
    from edgefn.offload.client import CloudClient

log = logging.getLogger("edgefn.daemon")
_TICK_S = 0.005  # the longest a received event waits for its group's commit
_SETTLE_EVERY = 10  # answered events leave the inbox every 50 ms, in one transaction
_SENSORS_EVERY = 1000  # temperatures and free memory are read every 5 s


class Daemon:
    """One edgefn daemon: `start()`, then `stop()` (the CLI's `run` does both around a signal).
    It is also the device the fleet agent drives (`edgefn.fleet.device.Device`)."""

    def __init__(self, settings: Settings, broken: dict[Path, str] | None = None):
        self.settings = settings
        self._broken = dict(broken or {})  # function folders whose build failed: reported, not run
        self.metrics = Metrics(metering=settings.metering)
        self._stopping = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self._swap = threading.Lock()  # one activation at a time
        self.release: Release | None = None  # the fleet release running (None: --functions)
        self.window = HealthWindow()
        self.fleet = FleetStore(settings.state_dir / "fleet")
        self.fleet_problem: str | None = None  # why the release active.json named did not start
        self.observe: ObserveServer | None = None
        self.agent: FleetAgent | None = None
        self.housekeeping_problem: str | None = None  # why the last settle or commit failed (a full disk, ...)
        self._housekeeping_failed = Every(60.0)
        self.deliveries = Deliveries(self._triggers)  # each trigger filter's last event, for /healthz
        self.notifier = Notifier()  # systemd, where it runs the daemon (Type=notify): ready, watchdog, stopping

    @property
    def functions(self) -> list[LoadedFunction]:
        return self.router.functions

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.profile = device_profile(s.profile, s.device_root, self.metrics)
        self.runtime = Runtime(s.state_dir / "components", memory_budget_mb=self.profile.capacity.memory_budget_mb,
                               watch_memory=s.metering)  # no metering, no budget: no map read on each instantiation
        self.state = StateStore(s.state_dir / "state.sqlite")
        self.cloud: CloudClient | None = None
        if s.cloud_url:
            from edgefn.offload.client import connect_cloud  # httpx only where an endpoint is configured

            self.cloud = connect_cloud(s, self.metrics)
        self.sensors = Sensors(self.profile, s.device_root, self.metrics)
        self.sensors.read()
        self.loader = Loader(s, self.runtime, self.profile, self.state, self.cloud, self.metrics, self.fleet)
        self.loader.broken = self._broken
        self.registry, functions = self._load_active()
        self.inbox = Inbox(s.state_dir / "inbox.sqlite" if s.journal == "disk" else ":memory:", durability=s.durability,
                           max_bytes=s.journal_max_bytes)
        replay, unsent = self.inbox.heads(), self.inbox.outbox()
        if replay or unsent:
            log.info("after a restart: %d answers to publish again, %d events to run again", len(unsent), len(replay))
        self.outbox = Outbox(self.inbox, lambda *a, **kw: self.connection.publish(*a, **kw), self.metrics,
                             on_settled=lambda n, nbytes: self.ingress.answered(n, nbytes), rows=len(unsent))
        self.unrouted = Unrouted(self.outbox.answer, self.outbox.done, self.metrics, self._triggers)
        self.router = Router(functions, self.sensors.under_pressure, self.outbox.done, self.unrouted,
                             shed=Overflow(self.outbox.answer, self.metrics),
                             journal=(s.inbox_max_events, s.inbox_max_bytes))
        self.metrics.usage.memory = lambda: {f.manifest.name: f.sandbox.memory_bytes() for f in self.functions}
        self.workers = Workers(s.max_payload_bytes, self.metrics, self.outbox.answer,
                               refill=lambda fn: fn.refill(self.inbox.events, self.sensors.under_pressure()),
                               max_hops=s.max_hops)
        # Ingress and the connection exist before any worker can publish (replayed events).
        self.ingress = Ingress(self.inbox, s.inbox_max_events, self._deliver,
                               ack=lambda mid, qos, priority: self.connection.ack(mid, qos, priority),
                               more_waiting=lambda: self.connection.has_more_to_read(), outstanding=len(replay),
                               max_bytes=s.inbox_max_bytes, outstanding_bytes=sum(size for _, size in replay),
                               max_payload_bytes=s.max_payload_bytes, max_held_bytes=s.held_max_bytes,
                               pause=lambda paused: self.connection.pause_reading(paused),
                               pause_high=lambda paused: self.connection.pause_reading(paused, high=True),
                               ack_many=lambda mids, priority: self.connection.ack_many(mids, priority))
        self.refusals = BrokerRefusals(self.metrics.broker_refusals, self._publish_filters)
        self.connection = Connection(s, self.ingress.on_message, self.router.filters(),
                                     on_disconnect=self.ingress.disconnected,
                                     subscriptions_file=s.state_dir / "subscriptions.json", refusals=self.refusals)
        self.outbox.replay(unsent)  # queued by paho until connected, before any new answer
        self.router.replay(replay)
        self.workers.start(self.functions)
        self._housekeeper = threading.Thread(target=self._housekeeping, name="edgefn-housekeeping", daemon=True)
        self._housekeeper.start()
        self.connection.start()
        self._report_failed()
        if s.metrics_port is not None:
            self.observe = ObserveServer(self.metrics, self.health, s.metrics_port)
        if s.fleet_url:
            from edgefn.fleet.agent import FleetAgent  # python-tuf and httpx only where a fleet is used

            self.agent = FleetAgent(self)
            self.agent.start()
        self.notifier.ready(f"serving {len(self.functions)} functions")

    def _report_failed(self) -> None:
        """Each local function that did not load: a metric, and one message on its error topic (sent
        once connected) that says why; `health()` shows them too."""
        for name, why in self.loader.failed.items():
            self.metrics.function_load_failed.labels(name).set(1)
            body = {"function": name, "reason": "load-failed", "error": why}
            self.connection.publish(ERRORS_TOPIC.format(function=name), json.dumps(body).encode(), lambda _r: None)

    def _triggers(self) -> list[str]:
        """The trigger filters of the functions running now, as written in their manifests."""
        return sorted({t for f in self.functions for t in f.manifest.trigger.topics})

    def _publish_filters(self) -> list[str]:
        """The publish filters of the functions running now (what a refused answer is counted under)."""
        return [t for f in self.functions for t in f.manifest.publish.topics]

    def _deliver(self, events: list[Event]) -> None:
        """Events the ingress has journaled (and acknowledged): to their functions' lanes."""
        self.metrics.events_received.inc(len(events))
        self.deliveries.record(e.topic for e in events)
        if redelivered := sum(e.replayed for e in events):  # ingress marks the broker's DUP copies replayed
            self.metrics.events_redelivered.inc(redelivered)
        self.router.deliver(events)

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop taking events, finish those in hand (within the deadline), then close."""
        if self._stopping.is_set():
            return
        self.notifier.stopping()
        if self.agent is not None:
            self.agent.stop()
        self._swap.acquire()  # an activation in progress finishes first; none starts after this
        self.ingress.close()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (busy(self.functions) or self._unfinished()):
            time.sleep(0.01)
        self._stopping.set()
        stop_workers(self.router.lanes())
        for thread in [t for fn in self.functions for t in fn.workers] + [self._housekeeper]:
            if thread is not None:
                thread.join(timeout=2)
        try:
            self.outbox.settle()  # what the broker has not acknowledged yet waits in the outbox
        except StorageError as exc:  # a full disk: those events stay in the inbox and run again at the next start
            log.warning("the journal could not take the last answers at stop (%s): their events run again at "
                        "the next start, marked as possible duplicates", exc)
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
        unanswered = self.ingress.outstanding - self.outbox.unsettled() > 0
        return unanswered or (self.outbox.awaiting_ack > 0 and self.connected)

    # -- releases ----------------------------------------------------------------------------------
    def _load_active(self) -> tuple[ModelRegistry, list[LoadedFunction]]:
        """What active.json names (docs/fleet.md), else --functions. A fleet release that no longer
        loads (a crash between recording and checking it, a file gone bad) is rolled back here: the
        previous release runs, the broken one is refused, and the agent reports why."""
        active = self.fleet.active()
        self.release = active.current
        if self.release is not None:
            log.info("fleet release %s", self.release.label)
        try:
            return self.loader.load(self.release, self.window)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the device must come up on something
            if self.release is None:
                raise  # --functions: the user's to mend
            self.fleet_problem = f"{self.release.label} does not start: {exc}"
            log.error("%s; going back to %s", self.fleet_problem,
                      active.previous.label if active.previous else "the local functions")
            self.fleet.set_active(active.refusing(self.release, active.rollout, run=active.previous))
            self.fleet.audit.append("rolled-back", by="device", reason=self.fleet_problem, rollout=active.rollout,
                                    bundle=self.release.bundle, version=self.release.version,
                                    to=active.previous.label if active.previous else "local functions")
            self.fleet.end_update()
            return self._load_active()

    def activate(self, release: Release | None, drain_timeout: float = 60.0) -> None:
        """Run `release` (None: the --functions again) instead of what runs now, while events flow.

        The new functions are loaded first (a release that cannot load raises here, and the old one
        keeps running); then routing switches in one step; then the old lanes drain: events already
        queued there finish on the old version and are published, in order, before the old workers
        stop, the old sandboxes close and the new workers start."""
        with self._swap:
            window = HealthWindow()
            registry, functions = self.loader.load(release, window)
            with self.router.swap():
                old, self.router.functions = self.router.functions, functions
                self.registry, self.window, self.release = registry, window, release
            self.connection.set_filters(self.router.filters())
            self.deliveries.forget_filters()
            self.refusals.forget_filters()
            log.info("activated %s", release.label if release else "the local functions")
            # The new workers start once the old lanes are empty: a function's answers leave in the order
            # its events came, across the swap too (new events wait in the new lanes meanwhile).
            retire(old, functions, drain_timeout, lambda pending, fn: self.outbox.answer(pending, [], fn.properties))
            self.workers.start(functions)

    def precompile(self, wasm: Path) -> None:
        """Compile a component into the cache now, so that activating its release costs no compile."""
        self.runtime.load(wasm)

    def record_accuracy(self, accuracy: float | None) -> None:
        """The accuracy the health check measured of the release running now (reported with its health)."""
        self.window.accuracy = accuracy

    def health_window(self) -> Health:
        """Events, errors and p99 of the functions running now, since they were activated."""
        return self.window.snapshot()

    def run_sample(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """What the functions running now answer to one event, outside the journal and the broker
        (a release's health check): their outputs, errors as messages on edgefn/errors/..."""
        event = Event(f"health-{time.monotonic_ns()}", topic, payload, time.time() * 1000)
        outputs: list[tuple[str, bytes]] = []
        for fn in self.router.route(topic):
            answer = fn.sandbox.handle_batch([event], metered=False)[0]  # a check, not the function's use
            if isinstance(answer, FunctionError):
                answer = [error_message(fn.manifest, event, answer)]
            outputs += [(m.topic, m.payload) for m in answer]
        return outputs

    @property
    def connected(self) -> bool:
        return self.connection.up

    @property
    def broker_error(self) -> str | None:
        return self.connection.last_error

    def wait_connected(self, timeout: float) -> None:
        self.connection.wait_connected(timeout)

    def _trouble(self, damage: str | None) -> tuple[str, str | None]:
        """The daemon's status (ok, degraded, stalled) and why, when it is not ok; `damage`: the journal's
        (read from its mark by the caller, once per /healthz)."""
        if self.inbox.problem is not None:  # a full disk: nothing new is taken until there is room again
            return "degraded", self.inbox.problem
        if self.housekeeping_problem is not None:
            return "stalled", f"the journal cannot be written: {self.housekeeping_problem}"
        pending = self.ingress.outstanding + self.ingress.held + self.outbox.awaiting_ack
        idle = time.monotonic() - self.outbox.progress_at
        if pending and idle > self.settings.stall_s:
            return "stalled", f"{pending} events or answers pending, nothing published or settled for {idle:.0f} s"
        if (holding := self.inbox.holding) is not None:  # the senders wait, as on a full disk, though not stuck
            return "degraded", f"{holding} ({self.ingress.held} held)"
        if damage is not None:  # events may be lost: said until an operator has seen it
            return "degraded", f"journal damage (acknowledge with `edgefn journal ack-damage`): {damage}"
        if not self.connected:
            return "degraded", self.broker_error or "connecting to the broker"
        if self.loader.failed:
            return "degraded", "; ".join(f"function {n} did not load: {why}" for n, why in self.loader.failed.items())
        if (unrouted := self.unrouted.problem()) is not None:
            return "degraded", unrouted
        if (refused := self.refusals.problem()) is not None:  # until the broker takes that filter again
            return "degraded", refused
        if (limits := self.connection.limits) is not None and limits.problem is not None:
            return "degraded", limits.problem
        if self.cloud is not None and (handoff := self.cloud.problem()) is not None:
            return "degraded", handoff  # the events still run here, but the operator meant them elsewhere
        return "ok", None

    def health(self) -> dict:
        damage = self.inbox.damage  # a read of the mark's SQLite file
        status, problem = self._trouble(damage)
        return {
            "status": status,
            "problem": problem,
            "journal": self.inbox.problem or self.inbox.holding or "ok",
            "journal_damage": damage,
            "state_damage": self.state.damage,
            "broker": "connected" if self.connected else (self.broker_error or "connecting"),
            "broker_sessions": self.connection.sessions,
            "broker_limits": limits.snapshot() if (limits := self.connection.limits) else None,
            "inbox_events": self.ingress.outstanding,
            "outbox_messages": self.outbox.rows,
            "profile": self.profile.name,
            "pressure": self.sensors.health(),
            "held_unacknowledged": self.ingress.held,
            "unrouted": self.unrouted.snapshot(),
            "broker_refusals": self.refusals.snapshot(),
            "last_delivery_s_ago": self.deliveries.snapshot(),
            "functions": {f.manifest.name: f.manifest.version for f in self.functions},
            "instances": {f.manifest.name: f.sandbox.pool() for f in self.functions},
            "memory_budget": self._memory_budget(),
            "failed_functions": dict(self.loader.failed),
            "release": self.release.label if self.release else None,
            "models": {name: self._model_status(name) for name in self._models_in_use()},
            "cloud": self._cloud_status(),
            "usage": self.usage(),
        }

    def _memory_budget(self) -> dict:
        """What the functions' instances hold of the device's memory budget: in the worker processes (each
        holds its share) where the functions run there, else in this process."""
        remote = next((f.sandbox for f in self.functions if isinstance(f.sandbox, RemoteSandbox)), None)
        return remote.budget() if remote is not None else self.runtime.budget.snapshot()

    def usage(self) -> dict[str, dict[str, float | int]]:
        """What each function has cost since the daemon started (edgefn.observe.usage)."""
        return self.metrics.usage.summary()

    def _cloud_status(self) -> dict | None:
        """The hand-off: its endpoint, its breaker, whether its last calls went through, its last error."""
        if self.cloud is None:
            return None
        breaker = self.cloud.breaker.stats()
        return {**self.cloud.status.snapshot(), "breaker": breaker.state.value, "breaker_reason": breaker.reason}

    def _model_status(self, name: str) -> dict:
        choice = self.registry.choice(name)
        return {"variant": choice.variant, "format": choice.format, "delegate": choice.delegate,
                "passed_over": [list(p) for p in choice.passed_over]}

    def _models_in_use(self) -> list[str]:
        return sorted({m for f in self.functions for m in f.manifest.models.use})

    # -- housekeeping --------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        tick = 0
        while not self._stopping.wait(_TICK_S):
            # Alive while this loop turns: a daemon hung here stops pinging, and systemd restarts it.
            self.notifier.watchdog()
            try:
                self.ingress.flush()  # a group left behind by a non-event packet
                tick += 1
                if tick % _SENSORS_EVERY == 0:
                    self.sensors.read()
                    self.inbox.checkpoint()  # the WAL shrinks, the disk reserve comes back once there is room
                if tick % _SETTLE_EVERY == 0:
                    self.outbox.settle()
                    self.metrics.inbox_depth.set(self.ingress.outstanding)
                    self.metrics.outbox_depth.set(self.outbox.rows)
                    self.metrics.broker_connected.set(1 if self.connected else 0)
                    if self.housekeeping_problem is not None:  # a settle went through again
                        log.warning("the journal can be written again (was: %s)", self.housekeeping_problem)
                        self.housekeeping_problem = None
            except StorageError as exc:  # the journal has said so in one line; health shows it
                self.housekeeping_problem = str(exc)
                time.sleep(0.5)
            except Exception as exc:  # a bug or an I/O error: keep trying, loudly but not a line a tick
                self.housekeeping_problem = f"{type(exc).__name__}: {exc}"
                if (skipped := self._housekeeping_failed.due()) is not None:
                    log.error("housekeeping failed, retrying (%d failures since the last line)", skipped, exc_info=True)
                time.sleep(0.5)
