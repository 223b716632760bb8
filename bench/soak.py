"""Soak benchmark: nothing lost under real conditions (overload, a restart with a backlog, big payloads, a flood).

Each scenario runs twice, each time against a fresh private mosquitto: first in its stock
configuration (a config file of two lines, `listener PORT 127.0.0.1` and `allow_anonymous true`;
LocalBroker adds `set_tcp_nodelay true`, which a stock broker does not have), then with
`max_queued_messages 100000` added (said to be tuned). `edgefn run` is a child process with the
digits function, a state dir of its own and --metrics-port (/metrics, /healthz); its compiled-component
cache is warmed first, by a daemon started and stopped once, so that a peak RSS is the daemon's own and
not the compiler's. Targets in brackets.

  overload  capacity C: answered events/s of a 3,000-event burst. Then three sensor clients publish
            together, 2C in all, for --duration s (default 600), then stop; the daemon gets up to 120 s
            to drain. Events sent (acknowledged by the broker), delivered to the daemon (its counter
            edgefn_events_received_total less edgefn_events_redelivered_total: the copies the broker
            sent again after a reconnect), results the broker acknowledged (the daemon's counter
            edgefn_messages_published_total), unanswered by the daemon at the end = min(sent,
            delivered) - those [0] (its /healthz then says where they are: journaled, in the outbox);
            at the bench's subscriber: distinct events answered, duplicate answers, unanswered =
            min(sent, delivered) - answered (a stock broker drops results for a subscriber 1,000
            behind, and its log says so: those lines are counted),
            the longest gap between two consecutive results while work was pending [<= 10 s], the
            daemon's peak RSS (VmHWM), the time SIGTERM took to end it [<= 15 s].
  restart   the daemon is started (its persistent session is then at the broker) and stopped; --backlog
            events (default 40,000) are published while it is away, and it is started again, a new event
            published every 0.25 s from then on. The backlog is built at the broker, as a device that was
            off or being upgraded finds it, rather than by a SIGKILL mid-flood (bench/reliability.py does
            that): a flood fills the journal only as far as ingest outruns the function, which is not far
            (a few thousand events, not 40,000). The stock broker keeps 1,000 of them (max_queued_messages) and drops the rest;
            that row shows what the daemon does with what it got. The time from the restart to the first
            answer to a new event [<= 30 s], to all answered with /healthz inbox_events and
            outbox_messages at 0, the largest inbox meanwhile, delivered (the new daemon's counter: what the
            broker kept, and the new events), answered, lost = delivered - answered [0], duplicates.
  payloads  --payloads events (default 4,000) of 250 kB each in one burst (the sensor keeps at most 64
            unacknowledged): digits JSON with a padding field the function ignores, within the daemon's
            default max_payload_bytes (256 KiB). Peak RSS of the daemon [<= 300 MB], answered (an error
            on edgefn/errors/digits counts), lost = min(sent, delivered) - answered [0].
  flood     one daemon, two functions: digits, and digits-flood (the same component and model under
            another name, triggered by sensors/+/digits-flood). digits is probed at 20 events/s, alone
            first, then while three sensors send digits-flood 3x its capacity (a 3,000-event burst) for
            --flood-duration s (default 30). Probe p50/p99 alone and during the flood [p99 <= 2x alone],
            probes unanswered 30 s after the flood [0].

    .venv/bin/python bench/soak.py [--only overload,restart,payloads,flood] [--brokers stock,tuned]
        [--duration 600] [--flood-duration 30] [--backlog 40000] [--payloads 4000] [--json-only]

A short run: --duration 30 --backlog 5000 --payloads 500. Results also go to bench/results/soak.json.
Exit status 0 whatever the figures; 1 when a scenario could not run (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (clients, child processes, payloads, digits images)

from edgefn.childproc import stop_gracefully  # noqa: E402
from edgefn.mqtt.local_broker import free_port, mosquitto_binary  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "soak.json"
TOPIC, FLOOD_TOPIC, PROBE_TOPIC = "sensors/soak/digits", "sensors/soak/digits-flood", "sensors/probe/digits"
BROKERS = {"stock": "", "tuned": "max_queued_messages 100000\n"}
SCENARIOS = ("overload", "restart", "payloads", "flood")
CAPACITY_BURST = 3000
DRAIN_S = 120.0
RESTART_CAP_S = 300.0
SIGTERM_WAIT_S = 60.0  # longer than the target, so that a slow exit is measured rather than cut short
PAYLOAD_BYTES = 250_000
PROBE_RATE = 20.0
TARGETS = {"lost_max": 0, "gap_max_s": 10.0, "sigterm_max_s": 15.0, "first_new_answer_max_s": 30.0,
           "peak_rss_max_mb": 300.0, "flood_p99_ratio_max": 2.0}


class Broker:
    """mosquitto with a config file of our own: stock, plus `extra` lines."""

    def __init__(self, name: str, workdir: Path, extra: str = ""):
        self.name, self.port = name, free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        conf = workdir / f"mosquitto-{name}-{self.port}.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{extra}")
        self.proc = e2e.System(f"mosquitto-{name}-{self.port}", [mosquitto_binary(), "-c", str(conf)], workdir)

    def __enter__(self) -> Broker:
        self.proc.start()
        deadline = time.monotonic() + 10
        while True:
            self.proc.check()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.proc.stop()
                    raise e2e.BenchError(f"mosquitto did not listen on port {self.port}") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()


@dataclass
class Daemon:
    """`edgefn run` as a child process, with what this benchmark reads from it."""

    system: e2e.System
    metrics_port: int

    def start(self, clients: e2e.Clients, images: list[list[int]], topic: str = TOPIC) -> None:
        self.system.start()
        try:
            e2e._wait_ready(clients, self.system, topic, images)
        except BaseException:
            self.stop()
            raise

    def _get(self, path: str, tries: int = 1) -> bytes:
        for n in range(tries):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as response:
                    return response.read()
            except OSError:
                if n == tries - 1:
                    raise
                self.system.check()
        raise AssertionError("unreachable")

    def counters(self, *names: str) -> list[float]:
        """The daemon's counters `edgefn_<name>_total` (0 where not yet counted)."""
        text = self._get("/metrics", 5).decode()
        found = [re.search(rf"^edgefn_{name}_total (\S+)$", text, re.M) for name in names]
        return [float(f.group(1)) if f else 0.0 for f in found]

    def received(self) -> float:
        """Distinct events journaled from the broker since this process started: its counter less the
        broker's second copies (DUP set, sent again after a reconnect)."""
        received, redelivered = self.counters("events_received", "events_redelivered")
        return received - redelivered

    def health(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._get("/healthz"))
        except (OSError, ValueError):
            return None  # busy or starting: asked again later

    def memory_mb(self, field_name: str = "VmHWM") -> float | None:
        """VmHWM (peak RSS) or VmRSS of the daemon, in MB."""
        try:
            status = Path(f"/proc/{self.system.proc.pid}/status").read_text()  # type: ignore[union-attr]
            return int(re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M).group(1)) / 1024  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return None

    def kill(self) -> None:
        proc, self.system.proc = self.system.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def stop(self) -> dict[str, Any]:
        """SIGTERM; how long the daemon took to exit, and its status."""
        proc, self.system.proc = self.system.proc, None
        if proc is None:
            return {}
        start = time.perf_counter()
        status = stop_gracefully(proc, SIGTERM_WAIT_S)
        return {"sigterm_s": time.perf_counter() - start, "exit_status": status}


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    images: list[list[int]]
    labels: list[int]
    flood: tuple[Path, Path] | None = None  # the digits-flood function and a models folder with its model
    warmed: bool = False  # the compiled-component cache

    def daemon(self, name: str, broker: Broker, flood: bool = False) -> Daemon:
        """A daemon whose state dir shares one compiled-component cache with the others."""
        state = self.workdir / name
        state.mkdir()
        (self.workdir / "components").mkdir(exist_ok=True)
        (state / "components").symlink_to(self.workdir / "components")
        functions, extra = [e2e.FUNCTION], []
        if flood:
            assert self.flood is not None
            functions.append(self.flood[0])
            extra = ["--models", str(self.flood[1])]
        port = free_port()
        return Daemon(e2e.edgefn_run(name, broker.url, self.workdir, functions, "--metrics-port", str(port),
                                     *extra, log_level="warning"), port)

    def payload(self, event_id: str, i: int) -> bytes:
        return e2e._payload(event_id, self.images[i % len(self.images)])

    def big_payload(self, event_id: str, i: int) -> bytes:
        doc = json.dumps({"id": event_id, "pixels": self.images[i % len(self.images)], "pad": ""})
        return doc[:-2].encode() + b"x" * (PAYLOAD_BYTES - len(doc)) + b'"}'


class Sensor:
    """A publishing client (MQTT 5) that keeps at most `window` of its events unacknowledged."""

    def __init__(self, port: int, name: str, window: int):
        self.window, self.published, self.acked = threading.Semaphore(window), 0, 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.on_socket_open = e2e._no_delay
        self.client.max_inflight_messages_set(0)  # the window bounds it
        self.client.on_publish = self._acked
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not connected.wait(10):
            raise e2e.BenchError(f"sensor {name} did not connect to the broker")

    def _acked(self, *_a: object) -> None:
        self.acked += 1
        self.window.release()

    def publish(self, topic: str, payload: bytes) -> None:
        self.window.acquire()
        self.client.publish(topic, payload, qos=1)
        self.published += 1

    def close(self, timeout: float = 30.0) -> int:
        """Wait for the broker's PUBACKs, disconnect; how many events the broker acknowledged."""
        deadline = time.monotonic() + timeout
        while self.acked < self.published and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client.disconnect()
        self.client.loop_stop()
        return self.acked


def _offer(port: int, topic: str, prefix: str, count: int, payload: Callable[[str, int], bytes],
           rate: float | None, seconds: float, clients: e2e.Clients, threads: int = 1, window: int = 1000,
           sent_at: dict[str, float] | None = None) -> dict[str, Any]:
    """Publish up to `count` events from `threads` sensors together, `rate` events/s in all (None: as fast as
    the broker takes them), for at most `seconds`; each registered with `clients` so its answer counts."""
    sensors = [Sensor(port, f"bench-soak-{prefix}-{k}", window) for k in range(threads)]
    start = time.perf_counter()
    end = start + seconds

    def send(k: int) -> None:
        for j, i in enumerate(range(k, count, threads)):
            now = time.perf_counter()
            if now > end:
                return
            if rate and start + j * threads / rate > now:
                time.sleep(start + j * threads / rate - now)
            event_id = f"{prefix}-{i}"
            with clients.lock:
                clients.expected[event_id] = -1
            if sent_at is not None:
                sent_at[event_id] = time.perf_counter()
            sensors[k].publish(topic, payload(event_id, i))

    workers = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stopped = time.perf_counter()
    sent = sum(s.published for s in sensors)
    acked = sum(s.close() for s in sensors)
    return {"sent": sent, "broker_acked": acked, "offered_eps": sent / max(stopped - start, 1e-9),
            "start": start, "stopped": stopped}


SUBSCRIBER_GRACE_S = 30.0  # the daemon has nothing left: how long its last results may take to reach the bench


def _drain(daemon: Daemon, clients: e2e.Clients, received_before: float, until: float, sent: int,
           published_before: float = 0.0) -> dict[str, Any]:
    """Wait until every event delivered to the daemon is answered and its inbox is empty, or `until`.

    Delivered counts distinct events (the broker's second copies are taken off), and a stock broker may
    drop events before delivering them: what must be answered is the smaller of what the broker took
    (`sent`) and what it delivered; answers are counted by distinct event id at the bench's subscriber.
    A stock broker also drops results on their way to that subscriber when it falls 1,000 behind
    (`max_queued_messages`; the bench's clients share one process): the daemon's own side is its counter
    of results the broker acknowledged (`published`), done once its inbox and outbox are empty."""
    daemon_done_at = None  # results still on their way to the subscriber are waited for, a while
    while True:
        daemon.system.check()
        delivered = int(daemon.received() - received_before)
        published = int(daemon.counters("messages_published")[0] - published_before)
        with clients.lock:
            answered = len(clients.arrived)
        due = min(sent, delivered)
        health = daemon.health() if answered >= due or published >= due else None
        done = health is not None and health["inbox_events"] == 0 and health["outbox_messages"] == 0
        if done and answered < due:
            daemon_done_at = daemon_done_at or time.perf_counter()
            done = time.perf_counter() - daemon_done_at > SUBSCRIBER_GRACE_S
        if done or time.perf_counter() > until:
            with clients.lock:
                duplicates, marked = clients.duplicates, clients.marked_duplicates
            return {"delivered": delivered, "answered": answered, "lost": max(0, due - answered), "drained": done,
                    "published": published, "lost_by_daemon": max(0, due - published),
                    "daemon_done": daemon_done_at or (time.perf_counter() if done else None),
                    "duplicates": duplicates, "duplicates_marked": marked, "ended": time.perf_counter()}
        time.sleep(0.5)


def _longest_gap(clients: e2e.Clients, start: float, end: float | None) -> float:
    """The longest time without a new result from `start` to the last result, or to `end` where results
    were missing then (the daemon's work done, or the drain's deadline): the broker's drops on the way to
    the bench's subscriber, after the daemon had nothing left, are no gap of the daemon's."""
    with clients.lock:
        times = sorted(clients.arrived.values())
    if end is not None:
        times = [t for t in times if t <= end]
    marks = [start, *times] + ([end] if end is not None else [])
    return float(np.max(np.diff(marks))) if len(marks) > 1 else float("nan")


def overload(ctx: Context, broker: Broker, clients: e2e.Clients) -> dict[str, Any]:
    daemon = ctx.daemon(f"overload-{broker.name}", broker)
    daemon.start(clients, ctx.images)
    try:
        capacity = e2e._burst(clients, daemon.system, TOPIC, ctx.images, ctx.labels, CAPACITY_BURST, {})
        clients.reset()
        before, rate = daemon.received(), 2 * capacity["throughput_eps"]
        published_before = daemon.counters("messages_published")[0]
        load = _offer(broker.port, TOPIC, "load", int(rate * ctx.args.duration) + 1, ctx.payload, rate,
                      ctx.args.duration, clients, threads=3)
        drain = _drain(daemon, clients, before, load["stopped"] + DRAIN_S, load["broker_acked"], published_before)
        done = drain["daemon_done"] or drain["ended"]  # the daemon's work over, or the drain's deadline
        gap = _longest_gap(clients, load["start"], done if drain["lost"] > 0 else None)
        doc = {"capacity_eps": capacity["throughput_eps"], "capacity_lost": capacity["lost"], **load, **drain,
               "drain_s": done - load["stopped"], "longest_gap_s": gap, "peak_rss_mb": daemon.memory_mb(),
               "health_at_end": daemon.health()}
    finally:
        stopped = daemon.stop()
    broker_log = broker.proc.log_tail(1 << 20)
    return {**doc, **stopped, "log_tail": daemon.system.log_tail(3000), "broker_log_tail": broker_log[-3000:],
            "broker_dropped_for_the_bench": broker_log.count("Outgoing messages are being dropped for client bench-e2e")}


def restart(ctx: Context, broker: Broker, clients: e2e.Clients) -> dict[str, Any]:
    daemon = ctx.daemon(f"restart-{broker.name}", broker)
    daemon.start(clients, ctx.images)  # its persistent session now exists at the broker
    daemon.stop()
    try:
        clients.reset()
        backlog = _offer(broker.port, TOPIC, "backlog", ctx.args.backlog, ctx.payload, None, 600, clients)
        restarted = time.perf_counter()
        daemon.system.start()
        new: list[str] = []
        first_new = drained = None
        largest_inbox = 0
        while time.perf_counter() - restarted < RESTART_CAP_S and drained is None:
            daemon.system.check()
            if first_new is None:
                new.append(f"new-{len(new)}")
                with clients.lock:
                    clients.expected[new[-1]] = -1
                clients.pub.publish(TOPIC, ctx.payload(new[-1], len(new)), qos=1)
            time.sleep(0.25)
            with clients.lock:
                new_answers = [clients.arrived[i] for i in new if i in clients.arrived]
                answered = len(clients.arrived)
            if new_answers and first_new is None:
                first_new = min(new_answers) - restarted
            health = daemon.health()
            largest_inbox = max(largest_inbox, health["inbox_events"] if health else 0)
            if (first_new is not None and health is not None and health["inbox_events"] == 0
                    and health["outbox_messages"] == 0 and answered >= daemon.received()):
                drained = time.perf_counter() - restarted
        delivered = int(daemon.received())
        with clients.lock:
            answered, duplicates, marked = len(clients.arrived), clients.duplicates, clients.marked_duplicates
        doc = {**backlog, "first_new_answer_s": first_new, "drained_s": drained, "new_sent": len(new),
               "delivered": delivered, "backlog_kept": delivered - len(new_answers), "answered": answered,
               "backlog_answered": answered - len(new_answers), "lost": delivered - answered,
               "largest_inbox": largest_inbox, "duplicates": duplicates, "duplicates_marked": marked,
               "peak_rss_mb": daemon.memory_mb()}
    finally:
        stopped = daemon.stop()
    return {**doc, **stopped}


def payloads(ctx: Context, broker: Broker, clients: e2e.Clients) -> dict[str, Any]:
    daemon = ctx.daemon(f"payloads-{broker.name}", broker)
    daemon.start(clients, ctx.images)
    try:
        rss_ready, before = daemon.memory_mb("VmRSS"), daemon.received()
        sent = _offer(broker.port, TOPIC, "big", ctx.args.payloads, ctx.big_payload, None, 600, clients, window=64)
        drain = _drain(daemon, clients, before, sent["stopped"] + DRAIN_S, sent["broker_acked"])
        doc = {**sent, **drain, "payload_bytes": PAYLOAD_BYTES, "rss_ready_mb": rss_ready,
               "peak_rss_mb": daemon.memory_mb()}
    finally:
        stopped = daemon.stop()
    return {**doc, **stopped}


def _probe(ctx: Context, broker: Broker, clients: e2e.Clients, prefix: str, seconds: float) -> dict[str, float]:
    """digits probed at 20 events/s for `seconds`: when each probe was sent."""
    sent_at: dict[str, float] = {}
    _offer(broker.port, PROBE_TOPIC, prefix, int(PROBE_RATE * seconds), ctx.payload, PROBE_RATE, seconds, clients,
           sent_at=sent_at)
    return sent_at


def _latency(clients: e2e.Clients | Any, sent_at: dict[str, float], wait_s: float = 30.0) -> dict[str, Any]:
    """The probes' latency (send to result), their answers awaited up to `wait_s`; `clients`: anything
    with a `lock` and the `arrived` times by event id (e2e.Clients, priority.py's Arrivals)."""
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        with clients.lock:
            if all(i in clients.arrived for i in sent_at):
                break
        time.sleep(0.1)
    with clients.lock:
        lat = [(clients.arrived[i] - t) * 1000 for i, t in sent_at.items() if i in clients.arrived]
    return {"probes": len(sent_at), "answered": len(lat), "lost": len(sent_at) - len(lat),
            "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if lat else float("nan")}


def flood(ctx: Context, broker: Broker, clients: e2e.Clients) -> dict[str, Any]:
    daemon = ctx.daemon(f"flood-{broker.name}", broker, flood=True)
    daemon.start(clients, ctx.images, PROBE_TOPIC)
    try:
        e2e._wait_ready(clients, daemon.system, FLOOD_TOPIC, ctx.images)
        alone = _latency(clients, _probe(ctx, broker, clients, "alone", min(ctx.args.flood_duration, 20.0)))
        clients.reset()
        capacity = e2e._burst(clients, daemon.system, FLOOD_TOPIC, ctx.images, ctx.labels, CAPACITY_BURST, {})
        clients.reset()
        clients.sub.unsubscribe("results/+/digits-flood")  # this process must not be what slows the probes
        rate, seconds = 3 * capacity["throughput_eps"], ctx.args.flood_duration
        before = daemon.received()
        offered: dict[str, Any] = {}
        flooder = threading.Thread(target=lambda: offered.update(_offer(
            broker.port, FLOOD_TOPIC, "flood", int(rate * seconds) + 1, ctx.payload, rate, seconds, clients,
            threads=3)), daemon=True)
        flooder.start()
        probes = _probe(ctx, broker, clients, "during", seconds)
        delivered = daemon.received() - before  # during the flood, probes included
        flooder.join()
        during = _latency(clients, probes)
        doc = {"capacity_eps": capacity["throughput_eps"], "flood_offered_eps": offered.get("offered_eps"),
               "flood_sent": offered.get("sent"), "delivered_eps": delivered / seconds, "alone": alone,
               "during": during, "p99_ratio": during["p99_ms"] / alone["p99_ms"], "lost": during["lost"]}
    finally:
        stopped = daemon.stop()
    return {**doc, **stopped}


def _flood_copy(workdir: Path) -> tuple[Path, Path]:
    return digits_copy(workdir, "digits-flood")


def digits_copy(workdir: Path, name: str, trigger: str = "") -> tuple[Path, Path]:
    """digits under another name (triggered by sensors/+/<name>, `trigger` lines added to its [trigger]):
    its manifest renamed and retriggered, its component copied (the name is not in it), and the digits
    model under that name too (the function asks for its namesake). The folder and the models folder."""
    folder, models = workdir / "functions" / name, workdir / "models" / name
    folder.mkdir(parents=True)
    models.mkdir(parents=True)
    shutil.copy(e2e.FUNCTION / "app.py", folder)
    manifest = (e2e.FUNCTION / "edgefn.toml").read_text().replace('digits"', f'{name}"')
    if trigger:
        line = f'topics = ["sensors/+/{name}"]'
        manifest = manifest.replace(line, f"{line}\n{trigger}")
    (folder / "edgefn.toml").write_text(manifest)
    (folder / "build").mkdir()
    shutil.copy(e2e.FUNCTION / "build" / "digits.wasm", folder / "build" / f"{name}.wasm")  # newer than its sources
    for f in (e2e.MODELS / "digits").iterdir():
        if f.name != "model.json":
            (models / f.name).symlink_to(f)
    meta = json.loads((e2e.MODELS / "digits" / "model.json").read_text())
    (models / "model.json").write_text(json.dumps({**meta, "name": name}))
    return folder, models.parent


RUNS = {"overload": overload, "restart": restart, "payloads": payloads, "flood": flood}


def attempt(scenario: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """A scenario's result, or {"error": why} when it could not run (the others still run)."""
    try:
        return scenario(*args)
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        if not isinstance(exc, e2e.BenchError):
            traceback.print_exc()
        return {"error": str(exc)}


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    e2e.ensure_built(e2e.FUNCTION)
    images, labels = e2e._digits()
    doc: dict[str, Any] = {"benchmark": "bench/soak.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "config": {k: getattr(args, k) for k in ("duration", "flood_duration", "backlog",
                                                                    "payloads", "only", "brokers")},
                           "brokers": {name: f"listener PORT 127.0.0.1\nallow_anonymous true\n{extra}"
                                       for name, extra in BROKERS.items()},
                           "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="edgefn-soak-") as tmp:
        ctx = Context(args, Path(tmp), images, labels)
        if "flood" in args.only:
            ctx.flood = _flood_copy(ctx.workdir)
        for scenario in args.only:
            for name in args.brokers:
                say(f"[bold]{scenario}[/], {name} broker")
                with Broker(name, ctx.workdir, BROKERS[name]) as broker:
                    clients = e2e.Clients(broker.port)
                    clients.sub.subscribe([("results/+/digits-flood", 1), ("edgefn/errors/+", 1)])
                    try:
                        if not ctx.warmed:  # compile the component once, outside any measured daemon
                            warm = ctx.daemon("warm-up", broker)
                            warm.start(clients, images)
                            warm.stop()
                            ctx.warmed = True
                        clients.reset()
                        result = attempt(RUNS[scenario], ctx, broker, clients)
                    finally:
                        clients.close()
                say(f"  [red]failed: {result['error']}[/]" if "error" in result else "  done")
                doc.setdefault(scenario, {})[name] = result
    e2e.write_results(RESULTS, doc)
    return doc


_MB, _S, _N, _EPS = "{:,.0f}", "{:.2f}", "{:,}", "{:,.0f}"
ROWS: dict[str, list[tuple[str, str, str, str, Callable[[Any], bool] | None]]] = {
    "overload": [("capacity C (events/s, burst of 3,000)", "capacity_eps", _EPS, "", None),
                 ("offered, 3 sensors (events/s)", "offered_eps", _EPS, "2 C", None),
                 ("events sent (acknowledged by the broker)", "broker_acked", _N, "", None),
                 ("delivered to the daemon (distinct)", "delivered", _N, "", None),
                 ("results the broker acknowledged (daemon's counter)", "published", _N, "", None),
                 ("unanswered by the daemon at the end = min(sent, delivered) - acknowledged", "lost_by_daemon", _N, "0",
                  lambda v: v <= TARGETS["lost_max"]),
                 ("answered at the bench's subscriber (distinct)", "answered", _N, "", None),
                 ("duplicate answers (marked as such)", "duplicates", _N, "", None),
                 ("unanswered there = min(sent, delivered) - answered", "lost", _N, "", None),
                 ("broker's 'dropped for client bench-e2e...' lines", "broker_dropped_for_the_bench", _N, "", None),
                 ("longest gap between results, work pending (s)", "longest_gap_s", _S, "<= 10 s",
                  lambda v: v <= TARGETS["gap_max_s"]),
                 ("drained within 120 s", "drained", "{}", "", None),
                 ("publishing stopped to the daemon drained (s)", "drain_s", _S, "", None),
                 ("daemon peak RSS (MB)", "peak_rss_mb", _MB, "", None),
                 ("SIGTERM to exit (s)", "sigterm_s", _S, "<= 15 s", lambda v: v <= TARGETS["sigterm_max_s"])],
    "restart": [("backlog sent while stopped (acknowledged by the broker)", "broker_acked", _N, "", None),
                ("backlog kept by the broker (delivered, less new events)", "backlog_kept", _N, "", None),
                ("largest inbox while catching up", "largest_inbox", _N, "", None),
                ("restart to first answer to a new event (s)", "first_new_answer_s", _S, "<= 30 s",
                 lambda v: v <= TARGETS["first_new_answer_max_s"]),
                ("restart to all answered, inbox+outbox empty (s)", "drained_s", _S, "", None),
                ("delivered to the daemon (backlog and new events)", "delivered", _N, "", None),
                ("answered (distinct)", "answered", _N, "", None),
                ("lost = min(sent, delivered) - answered", "lost", _N, "0", lambda v: v <= TARGETS["lost_max"]),
                ("duplicates (marked)", "duplicates", _N, "", None),
                ("daemon peak RSS (MB)", "peak_rss_mb", _MB, "", None)],
    "payloads": [("events of 250 kB sent (acknowledged by the broker)", "broker_acked", _N, "", None),
                 ("delivered to the daemon", "delivered", _N, "", None),
                 ("answered (results and errors)", "answered", _N, "", None),
                 ("lost = min(sent, delivered) - answered", "lost", _N, "0", lambda v: v <= TARGETS["lost_max"]),
                 ("daemon RSS at its first answer (MB)", "rss_ready_mb", _MB, "", None),
                 ("daemon peak RSS (MB)", "peak_rss_mb", _MB, "<= 300 MB", lambda v: v <= TARGETS["peak_rss_max_mb"])],
    "flood": [("digits-flood capacity (events/s)", "capacity_eps", _EPS, "", None),
              ("flood offered, 3 sensors (events/s)", "flood_offered_eps", _EPS, "3x capacity", None),
              ("delivered to the daemon meanwhile, probes included (events/s)", "delivered_eps", _EPS, "", None),
              ("probe p50 alone (ms)", "alone.p50_ms", _S, "", None),
              ("probe p50 during the flood (ms)", "during.p50_ms", _S, "", None),
              ("probe p99 alone (ms)", "alone.p99_ms", _S, "", None),
              ("probe p99 during the flood (ms)", "during.p99_ms", _S, "", None),
              ("p99 during / alone", "p99_ratio", _S, "<= 2x", lambda v: v <= TARGETS["flood_p99_ratio_max"]),
              ("probes lost", "lost", _N, "0", lambda v: v <= TARGETS["lost_max"])],
}


def _print_tables(doc: dict[str, Any], brokers: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for scenario, rows in ROWS.items():
        if scenario not in doc:
            continue
        t = Table(title=f"soak: {scenario}")
        t.add_column("")
        for name in brokers:
            t.add_column(f"{name} broker", justify="right")
        t.add_column("target")
        for name in brokers:
            t.add_column(name)
        for label, key, fmt, target, check in rows:
            values, marks = [], []
            for name in brokers:
                result = doc[scenario][name]
                value: Any = result
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                values.append("failed" if "error" in result else "-" if value is None else fmt.format(value))
                ok = check is not None and value is not None and value == value and check(value)
                marks.append("" if check is None else "[green]met[/]" if ok else "[red]missed[/]")
            t.add_row(label, *values, target, *marks)
        console.print(t)
        for name in brokers:
            if "error" in doc[scenario][name]:
                console.print(f"[red]{scenario}, {name} broker: {doc[scenario][name]['error']}[/]")
    console.print(f"results written to {RESULTS.relative_to(e2e.ROOT)}")


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(allowed)}")
        return names
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", type=_names(SCENARIOS), default=list(SCENARIOS), help="scenarios to run")
    parser.add_argument("--brokers", type=_names(tuple(BROKERS)), default=list(BROKERS), help="broker configurations")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of 2C offered load (overload)")
    parser.add_argument("--flood-duration", type=float, default=30.0, help="seconds of the flood (flood)")
    parser.add_argument("--backlog", type=int, default=40_000, help="events of the backlog (restart)")
    parser.add_argument("--payloads", type=int, default=4000, help="events of 250 kB (payloads)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)

    def say(msg: str) -> None:
        if not args.json_only:
            from rich.console import Console

            Console(stderr=True).print(msg, highlight=False)

    def _terminate(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds like Ctrl-C: the children and the brokers are stopped on the way out

    signal.signal(signal.SIGTERM, _terminate)
    try:
        doc = run(args, say)
    except KeyboardInterrupt:
        print("soak: interrupted; the children and the brokers were stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and exits non-zero
        if not isinstance(exc, e2e.BenchError):
            traceback.print_exc()
        print(f"soak: failed: {exc}", file=sys.stderr)
        return 1
    if args.json_only:
        print(json.dumps(doc, indent=2))
    else:
        _print_tables(doc, args.brokers)
    failed = any("error" in doc[s][b] for s in args.only for b in args.brokers)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
