"""End-to-end benchmark: edgefn against the plain script a user would write instead.

One private mosquitto (`LocalBroker()`: stock settings, Nagle on; `--tuned`: set_tcp_nodelay true, as a
broker tuned for latency would be) and the same digits model
(models/digits/model.onnx) serve two systems, one after the other, never both at once:

  plain   bench/plain_digits.py as a child process: paho-mqtt 2 on default settings, on_message ->
          json -> onnxruntime (CPU, one thread) -> publish results/<device>/digits at QoS1.
  edgefn  `python -m edgefn.cli run` as a child process with examples/functions/digits (built
          first if needed) and models/.

For each system, once it answers a probe event (so that it is subscribed):

  1. latency, one event at a time: --serial events (default 500, after 50 warm-up) published at
     QoS1 by a sensor client in this process; each timed from just before publish() to the arrival
     of its result at a subscriber client in this process (perf_counter); the next is sent once the
     result is in, or after 2 s (the event counts as lost). Reported: p50 and p99 in ms.
  2. burst: --burst events (default 5,000) published at QoS1 as fast as paho takes them (it queues
     them, 20 in flight; with --qos 0 none wait for the broker); the subscriber counts distinct event
     ids answered, until all are or no new result came for 5 s. Reported: throughput = answered / (first publish -> last result) and
     lost = sent - answered.

Payloads are scikit-learn's held-out digits (images 1400..1796, cycled) with unique event ids;
each phase uses its own sensor device name (sensors/bench-plain/digits, sensors/bench-edgefn/digits)
and results with unknown ids are ignored. Targets: p50 ratio (edgefn/plain) <= 1.5, throughput
ratio (edgefn/plain) >= 1.0, edgefn lost == 0. The script exits 0 whatever the figures (it is a
benchmark); non-zero only if something failed to run. Results also go to bench/results/e2e.json.

    .venv/bin/python bench/e2e.py [--serial N] [--burst N] [--tuned] [--qos 0|1] [--pad BYTES] [--json-only]

--pad BYTES: each payload carries a JSON string field of that many bytes, which both systems parse with
the rest (the payload-size axis: 10000 and 250000 give the 10 kB and 250 kB rows).

--qos 0: the sensor publishes at QoS 0 (most sensors do); results stay QoS1. Nothing then tells the
sensor whether the broker took an event, and a QoS 0 event a system drops is lost for good.

Takes about 30-60 s. The client sockets of this process use TCP_NODELAY (for both systems alike),
so that Nagle's algorithm does not show up in the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.childproc import stop_gracefully

ROOT = Path(__file__).resolve().parent.parent
FUNCTION = ROOT / "examples" / "functions" / "digits"
MODELS = ROOT / "models"
MODEL = MODELS / "digits" / "model.onnx"
PLAIN = ROOT / "bench" / "plain_digits.py"
RESULTS = ROOT / "bench" / "results" / "e2e.json"

WARMUP = 50
SERIAL_TIMEOUT_S = 2.0
BURST_IDLE_S = 5.0
BURST_CAP_S = 120.0
READY_TIMEOUT_S = 60.0
TARGETS = {"p50_ratio_max": 1.5, "throughput_ratio_min": 1.0, "lost_max": 0}


class BenchError(Exception):
    pass


def _digits() -> tuple[list[list[int]], list[int]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x[1400:].astype(int).tolist(), y[1400:].astype(int).tolist()


def _no_delay(_client: mqtt.Client, _userdata: object, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def _cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU time of a process and of its live children (edgefn's worker processes; Linux
    /proc), None where it cannot be read."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return own + sum(_cpu_seconds(child) or 0.0 for child in _children(pid))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        return []


def results_subscriber(port: int, topic: str, on_message: Any, name: str) -> mqtt.Client:
    """A subscriber of results, subscribed when this returns: MQTT 5 with a large Receive Maximum, so that
    it is never where results get lost (a 3.1.1 one that falls behind loses them at mosquitto's queue)."""
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    client.on_socket_open = _no_delay
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 65535
    client.connect("127.0.0.1", port, properties=props)
    client.loop_start()
    if not subscribed.wait(10):
        client.loop_stop()
        raise BenchError(f"the benchmark's subscriber to {topic} did not subscribe")
    return client


class Clients:
    """The sensor (publisher) and the subscriber of results, both in this process."""

    def __init__(self, port: int, persistent: bool = False, qos: int = 1, pad: int = 0):
        """persistent: both clients keep MQTT 5 sessions that survive a broker restart; qos: the sensor's."""
        self.qos = qos
        self.pad = pad  # bytes of filler in each payload (--pad)
        self.lock = threading.Lock()
        self.expected: dict[str, int] = {}  # event id -> true label, for the ids we wait for
        self.arrived: dict[str, float] = {}  # event id -> perf_counter at its first result
        self.correct = 0
        self.duplicates = 0
        self.marked_duplicates = 0  # of those: marked `edgefn-duplicate: possible`, or sent again by the broker
        self.unknown = 0
        self.last_arrival = 0.0
        self.waiting_for: str | None = None
        self.answer = threading.Event()
        self.acked = 0  # PUBACKs of the sensor's events
        self.last_ack = 0.0

        # The result subscriber is MQTT 5 with a large Receive Maximum: it must not be where
        # results get lost (a 3.1.1 subscriber that falls behind a fast producer loses results at
        # mosquitto's 1000-message queue), so "lost" counts only what the system under test lost.
        subscribed = threading.Event()
        self.sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-e2e-sub-{os.getpid()}",
                               protocol=mqtt.MQTTv5)
        self.sub.on_socket_open = _no_delay
        self.sub.on_message = self._message
        self.sub.on_subscribe = lambda *_a: subscribed.set()
        self.sub.on_connect = lambda c, *_a: c.subscribe("results/+/digits", qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 65535
        if persistent:
            props.SessionExpiryInterval = 3600
        self.sub.connect("127.0.0.1", port, properties=props, clean_start=not persistent)
        self.sub.loop_start()

        connected = threading.Event()
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-e2e-sensor-{os.getpid()}",
                               protocol=mqtt.MQTTv5 if persistent else mqtt.MQTTv311)
        self.pub.on_socket_open = _no_delay
        self.pub.on_connect = lambda *_a: connected.set()
        self.pub.on_publish = self._published
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            self.pub.connect("127.0.0.1", port, properties=props, clean_start=False)
        else:
            self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()
        if not (subscribed.wait(10) and connected.wait(10)):
            self.close()
            raise BenchError("the benchmark's own MQTT clients did not connect to the broker")

    def _message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        try:
            doc = json.loads(msg.payload)
            event_id = doc["event_id"]
        except (ValueError, KeyError, TypeError):
            with self.lock:
                self.unknown += 1
            return
        with self.lock:
            if event_id not in self.expected:
                self.unknown += 1
                return
            if event_id in self.arrived:
                self.duplicates += 1
                props = dict(getattr(msg.properties, "UserProperty", None) or [])
                self.marked_duplicates += int(props.get("edgefn-duplicate") == "possible" or bool(msg.dup))
                return
            self.arrived[event_id] = now
            self.last_arrival = now
            self.correct += int(doc.get("label") == self.expected[event_id])
            if event_id == self.waiting_for:
                self.answer.set()

    def _published(self, *_a: object) -> None:
        now = time.perf_counter()
        with self.lock:
            self.acked += 1
            self.last_ack = now

    def reset(self) -> None:
        with self.lock:
            self.expected.clear()
            self.arrived.clear()
            self.correct = self.duplicates = self.marked_duplicates = self.unknown = self.acked = 0
            self.last_arrival = self.last_ack = 0.0
            self.waiting_for = None
            self.answer.clear()

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


class System:
    """One system under test: a child process in its own session, stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], workdir: Path):
        self.name, self.cmd = name, cmd
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")
        try:
            # A session of its own: Ctrl-C reaches this process only, which stops the child itself.
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        return stop_gracefully(proc)


def edgefn_run(name: str, broker_url: str, workdir: Path, functions: list[Path], *extra: str,
               log_level: str = "error", launcher: tuple[str, ...] = ("-m", "edgefn.cli")) -> System:
    """`edgefn run` as a system under test: its own state dir and client id, components built already.
    `launcher`: what runs `edgefn` (bench/stages.py's runs it with a stage clock)."""
    return System(name, [sys.executable, *launcher, "run", "--broker", broker_url,
                         *(arg for f in functions for arg in ("--functions", str(f))), "--models", str(MODELS),
                         "--state-dir", str(workdir / name), "--client-id", f"bench-{name}", "--no-build",
                         "--log-level", log_level, *extra], workdir)


def ensure_built(function: Path) -> None:
    from edgefn.functions.build import build, needs_build
    from edgefn.functions.manifest import load_manifest

    if needs_build(function, load_manifest(function)):
        shown = function.relative_to(ROOT) if function.is_relative_to(ROOT) else function
        print(f"building {shown} (componentize-py, about 10 s) ...", file=sys.stderr)
        build(function)


def _payload(event_id: str, pixels: list[int], pad: int = 0) -> bytes:
    doc: dict[str, Any] = {"id": event_id, "pixels": pixels}
    if pad:  # a string field that both systems parse with the rest and neither uses
        doc["pad"] = "x" * pad
    return json.dumps(doc).encode()


def _wait_ready(clients: Clients, system: System, topic: str, images: list[list[int]]) -> float:
    """Publish probe events until one is answered; the seconds it took."""
    start = time.perf_counter()
    n = 0
    while True:
        system.check()
        if time.perf_counter() - start > READY_TIMEOUT_S:
            raise BenchError(f"{system.name} answered no probe event within {READY_TIMEOUT_S:g} s:\n{system.log_tail()}")
        event_id = f"{system.name}-probe-{n}"
        with clients.lock:
            clients.expected[event_id] = -1
        clients.pub.publish(topic, _payload(event_id, images[n % len(images)], clients.pad), qos=clients.qos)
        n += 1
        time.sleep(0.25)
        with clients.lock:
            if clients.arrived:
                break
    ready = time.perf_counter() - start
    time.sleep(0.5)  # let late answers to earlier probes come in, then forget them all
    clients.reset()
    return ready


def _serial(clients: Clients, system: System, topic: str, images: list[list[int]], labels: list[int],
            n: int, tag: str) -> dict[str, Any]:
    latencies: list[float] = []
    lost = 0
    for i in range(n):
        if i % 50 == 0:
            system.check()
        k = i % len(images)
        event_id = f"{system.name}-{tag}-{i}"
        payload = _payload(event_id, images[k], clients.pad)
        with clients.lock:
            clients.expected[event_id] = labels[k]
            clients.waiting_for = event_id
            clients.answer.clear()
        t0 = time.perf_counter()
        clients.pub.publish(topic, payload, qos=clients.qos)
        if clients.answer.wait(SERIAL_TIMEOUT_S):
            with clients.lock:
                latencies.append((clients.arrived[event_id] - t0) * 1000.0)
        else:
            lost += 1
    with clients.lock:
        correct = clients.correct
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"events": n, "answered": len(latencies), "lost": lost,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(np.max(lat)),
            "mean_ms": float(np.mean(lat)), "accuracy": correct / max(len(latencies), 1)}


def _burst(clients: Clients, system: System, topic: str, images: list[list[int]], labels: list[int],
           n: int, pids: dict[str, int | None]) -> dict[str, Any]:
    ids = [f"{system.name}-burst-{i}" for i in range(n)]
    payloads = [_payload(ids[i], images[i % len(images)], clients.pad) for i in range(n)]
    with clients.lock:
        for i, event_id in enumerate(ids):
            clients.expected[event_id] = labels[i % len(labels)]
    cpu_before = {k: _cpu_seconds(p) for k, p in pids.items()}
    sent_at = np.empty(n)
    t0 = time.perf_counter()
    for i in range(n):
        sent_at[i] = time.perf_counter()
        clients.pub.publish(topic, payloads[i], qos=clients.qos)
    published = time.perf_counter()
    deadline = t0 + BURST_CAP_S
    while True:
        time.sleep(0.02)
        now = time.perf_counter()
        with clients.lock:
            answered, last = len(clients.arrived), clients.last_arrival
        if answered >= n or now - max(last, published) > BURST_IDLE_S or now > deadline:
            break
        system.check()
    cpu_after = {k: _cpu_seconds(p) for k, p in pids.items()}
    with clients.lock:
        arrivals = dict(clients.arrived)
        correct, duplicates, acked, last_ack = clients.correct, clients.duplicates, clients.acked, clients.last_ack
    answered = len(arrivals)
    span = (max(arrivals.values()) - t0) if arrivals else float("nan")
    lat = np.array([(arrivals[e] - sent_at[i]) * 1000.0 for i, e in enumerate(ids) if e in arrivals] or [np.nan])
    cpu = {k: (round(cpu_after[k] - cpu_before[k], 3) if cpu_after[k] is not None and cpu_before[k] is not None else None)
           for k in pids}
    return {"events": n, "answered": answered, "lost": n - answered, "duplicates": duplicates,
            "seconds": span, "throughput_eps": answered / span if answered else 0.0,
            "publish_call_s": published - t0,
            "broker_acked": acked, "broker_ack_rate_eps": acked / (last_ack - t0) if acked else 0.0,
            "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
            "accuracy": correct / max(answered, 1),
            "cpu_s": cpu, "cpu_us_per_answered_event": {
                k: (round(v / answered * 1e6, 1) if v is not None and answered else None) for k, v in cpu.items()}}


def _measure(system: System, clients: Clients, broker_pid: int | None, images: list[list[int]],
             labels: list[int], serial_n: int, burst_n: int, say: Any) -> dict[str, Any]:
    topic = f"sensors/bench-{system.name}/digits"
    clients.reset()
    say(f"[bold]{system.name}[/]: starting it as a child process")
    system.start()
    try:
        ready = _wait_ready(clients, system, topic, images)
        say(f"  answering {ready:.1f} s after it started; {WARMUP} warm-up + {serial_n} serial events")
        _serial(clients, system, topic, images, labels, WARMUP, "warmup")
        clients.reset()
        serial = _serial(clients, system, topic, images, labels, serial_n, "serial")
        say(f"  serial: p50 {serial['p50_ms']:.3f} ms, p99 {serial['p99_ms']:.3f} ms, lost {serial['lost']}; "
            f"burst of {burst_n}")
        time.sleep(0.3)
        clients.reset()
        assert system.proc is not None
        pids = {system.name: system.proc.pid, "mosquitto": broker_pid, "bench": os.getpid()}
        burst = _burst(clients, system, topic, images, labels, burst_n, pids)
        say(f"  burst: {burst['throughput_eps']:,.0f} events/s, lost {burst['lost']} "
            f"(broker took the events at {burst['broker_ack_rate_eps']:,.0f}/s)")
    finally:
        status = system.stop()
    return {"ready_s": ready, "serial": serial, "burst": burst, "exit_status": status,
            "log_tail": system.log_tail(1000)}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _summary(plain: dict[str, Any], edge: dict[str, Any]) -> dict[str, Any]:
    p50 = _ratio(edge["serial"]["p50_ms"], plain["serial"]["p50_ms"])
    p99 = _ratio(edge["serial"]["p99_ms"], plain["serial"]["p99_ms"])
    thr = _ratio(edge["burst"]["throughput_eps"], plain["burst"]["throughput_eps"])
    return {"p50_ratio": p50, "p99_ratio": p99, "throughput_ratio": thr,
            "met": {"p50_ratio": bool(p50 <= TARGETS["p50_ratio_max"]),
                    "throughput_ratio": bool(thr >= TARGETS["throughput_ratio_min"]),
                    "lost": bool(edge["burst"]["lost"] <= TARGETS["lost_max"])}}


def _print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    plain, edge, s = doc["plain"], doc["edgefn"], doc["summary"]
    mark = {True: "[green]met[/]", False: "[red]missed[/]"}
    t = Table(title=f"edgefn vs a plain paho + onnxruntime script "
                    f"(digits, sensor QoS{doc['config']['qos']}, {doc['config'].get('pad_bytes', 0)} bytes of padding, "
                    f"{doc['env']['cpus']} CPUs)")
    for col, just in (("", "left"), ("plain", "right"), ("edgefn", "right"), ("ratio", "right"),
                      ("target", "left"), ("", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    t.add_row(f"latency p50 (ms, n={doc['config']['serial']})", f"{plain['serial']['p50_ms']:.3f}",
              f"{edge['serial']['p50_ms']:.3f}", f"{s['p50_ratio']:.2f}x",
              f"ratio <= {TARGETS['p50_ratio_max']}", mark[s["met"]["p50_ratio"]])
    t.add_row("latency p99 (ms)", f"{plain['serial']['p99_ms']:.3f}", f"{edge['serial']['p99_ms']:.3f}",
              f"{s['p99_ratio']:.2f}x", "-", "")
    t.add_row(f"burst throughput (events/s, n={doc['config']['burst']})", f"{plain['burst']['throughput_eps']:,.0f}",
              f"{edge['burst']['throughput_eps']:,.0f}", f"{s['throughput_ratio']:.2f}x",
              f"ratio >= {TARGETS['throughput_ratio_min']}", mark[s["met"]["throughput_ratio"]])
    t.add_row("burst lost", str(plain["burst"]["lost"]), str(edge["burst"]["lost"]), "",
              "edgefn lost == 0", mark[s["met"]["lost"]])
    console = Console()
    console.print(t)

    d = Table(title="details", title_justify="left")
    d.add_column("")
    d.add_column("plain", justify="right")
    d.add_column("edgefn", justify="right")
    d.add_row("serial lost (2 s timeout)", str(plain["serial"]["lost"]), str(edge["serial"]["lost"]))
    d.add_row("serial accuracy", f"{plain['serial']['accuracy']:.3f}", f"{edge['serial']['accuracy']:.3f}")
    d.add_row("burst latency p50 / p99 (ms)",
              *(f"{x['burst']['latency_p50_ms']:.1f} / {x['burst']['latency_p99_ms']:.1f}" for x in (plain, edge)))
    d.add_row("burst: broker PUBACK rate to the sensor (events/s)",
              *(f"{x['burst']['broker_ack_rate_eps']:,.0f}" for x in (plain, edge)))
    for who in ("system", "mosquitto", "bench"):
        cells = []
        for name, x in (("plain", plain), ("edgefn", edge)):
            v = x["burst"]["cpu_us_per_answered_event"].get(name if who == "system" else who)
            cells.append("-" if v is None else f"{v:,.0f}")
        d.add_row(f"burst CPU per answered event, {who} (µs)", *cells)
    d.add_row("time to first answer after start (s)", f"{plain['ready_s']:.2f}", f"{edge['ready_s']:.2f}")
    d.add_row("exit status after SIGTERM", str(plain["exit_status"]), str(edge["exit_status"]))
    console.print(d)
    console.print(f"results written to {RESULTS.relative_to(ROOT)}")


def write_results(path: Path, doc: dict[str, Any]) -> None:
    """A benchmark's results as indented JSON under bench/results/ (every benchmark writes its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def report(doc: dict[str, Any], json_only: bool, show: Any) -> int:
    """A benchmark's results on stdout: the JSON alone, or `show(doc)`'s tables; exit status 0."""
    if json_only:
        print(json.dumps(doc, indent=2))
    else:
        show(doc)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgefn.mqtt.local_broker import LocalBroker, mosquitto_binary

    quiet = args.json_only

    def say(msg: str) -> None:
        if not quiet:
            from rich.console import Console

            Console(stderr=True).print(msg)

    if not MODEL.exists():
        raise BenchError(f"{MODEL} is missing (make models)")
    ensure_built(FUNCTION)
    images, labels = _digits()
    mosquitto_version = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout.split("\n")[0]

    with LocalBroker(tuned=args.tuned) as broker, tempfile.TemporaryDirectory(prefix="edgefn-bench-") as tmp:
        workdir = Path(tmp)
        broker_pid = broker._proc.pid if broker._proc is not None else None  # for CPU accounting only
        say(f"broker {broker.url} ({mosquitto_version})")
        plain = System("plain", [sys.executable, str(PLAIN), broker.url, str(MODEL)], workdir)
        workers = () if args.workers is None else ("--workers", str(args.workers))
        edge = edgefn_run("edgefn", broker.url, workdir, [FUNCTION], *workers, log_level="warning")
        clients = Clients(broker.port, qos=args.qos, pad=args.pad)
        try:
            results = {}
            for system in (plain, edge):
                results[system.name] = _measure(system, clients, broker_pid, images, labels,
                                                args.serial, args.burst, say)
        finally:
            for system in (plain, edge):
                system.stop()
            clients.close()

    import onnxruntime
    import paho.mqtt

    doc = {
        "benchmark": "bench/e2e.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"serial": args.serial, "warmup": WARMUP, "burst": args.burst,
                   "serial_timeout_s": SERIAL_TIMEOUT_S, "burst_idle_s": BURST_IDLE_S, "qos": args.qos,
                   "pad_bytes": args.pad, "workers": args.workers},
        "env": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                "paho_mqtt": paho.mqtt.__version__, "onnxruntime": onnxruntime.__version__,
                "mosquitto": mosquitto_version},
        "plain": results["plain"], "edgefn": results["edgefn"],
        "summary": _summary(results["plain"], results["edgefn"]), "targets": TARGETS,
    }
    write_results(RESULTS, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serial", type=int, default=500, help="events timed one at a time (after 50 warm-up)")
    parser.add_argument("--burst", type=int, default=5000, help="events in the burst")
    parser.add_argument("--workers", type=int, default=None, help="edgefn's worker processes (default: its own)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    parser.add_argument("--tuned", action="store_true", help="a broker tuned for latency (set_tcp_nodelay true)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1,
                        help="the sensor's QoS (results are QoS1 either way); at 0 the broker acknowledges nothing")
    parser.add_argument("--pad", type=int, default=0, metavar="BYTES",
                        help="filler bytes in each payload: 10000 and 250000 for the 10 kB and 250 kB rows")
    args = parser.parse_args(argv)
    if args.serial < 1 or args.burst < 1:
        parser.error("--serial and --burst must be at least 1")
    if not 0 <= args.pad <= 256_000:
        parser.error("--pad must be from 0 to 256000 (edgefn's max_payload_bytes is 256 KiB)")

    return run_main("e2e", run, args, _print_table)


def run_main(name: str, run: Any, args: argparse.Namespace, show: Any) -> int:
    """A benchmark's `run(args)` with its report: SIGTERM unwinds like Ctrl-C, so the children and the
    broker are stopped on the way out; a failure is one line (a traceback only for a bug) and status 1."""

    def _terminate(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        doc = run(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; the children and the broker were stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and exits non-zero
        if not isinstance(exc, BenchError):
            traceback.print_exc()
        print(f"{name}: failed: {exc}", file=sys.stderr)
        return 1
    return report(doc, args.json_only, show)


if __name__ == "__main__":
    sys.exit(main())
