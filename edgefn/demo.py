"""`edgefn demo`: the whole path on embedded defaults, with a live table.

A private mosquitto on a free loopback port; `edgefn run` as a child process with the digits
function and model; simulated sensors publishing real handwritten digits (scikit-learn's
held-out images 1400..1796) at QoS1, with one malformed payload in fifty to show the error path;
a monitor that subscribes to the results and errors and measures what a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgefn.childproc import stop_gracefully
from edgefn.errors import EdgefnError
from edgefn.functions.build import build, needs_build
from edgefn.functions.manifest import load_manifest
from edgefn.mqtt.local_broker import LocalBroker, free_port
from edgefn.topics import ERRORS_FILTER, is_errors_topic

ROOT = Path(__file__).resolve().parent.parent
FUNCTION = ROOT / "examples" / "functions" / "digits"
MODELS = ROOT / "models"
BAD_EVERY = 50
_BAD_PAYLOADS = [b"not json at all", b'{"id": "x", "pixels": [1, 2, 3]}', b'{"pixels": "nope"}', b"\xff\xfe\x00"]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x[1400:].astype(int), y[1400:]


class Monitor:
    """Subscribes to results and errors; keeps the figures of the live table."""

    def __init__(self, broker_port: int):
        self.sent: dict[str, tuple[float, int]] = {}
        self.lock = threading.Lock()
        self.results = 0
        self.correct = 0
        self.errors = 0
        self.bad_sent = 0
        self.ran_on: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=2000)
        self.done_times: deque[float] = deque(maxlen=20000)
        self.answered: set[str] = set()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgefn-demo-monitor-{os.getpid()}")
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", broker_port)
        self.client.subscribe([("results/+/digits", 1), (ERRORS_FILTER, 1)])
        self.client.loop_start()

    def _message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.done_times.append(now)
            if is_errors_topic(msg.topic):
                self.errors += 1
                return
            event_id = doc.get("event_id")
            if event_id in self.answered or event_id not in self.sent:
                return  # a duplicate after a restart, or not ours
            self.answered.add(event_id)
            sent_at, label = self.sent[event_id]
            self.results += 1
            self.correct += int(doc.get("label") == label)
            self.ran_on[str(doc.get("ran_on"))] += 1
            self.latencies.append((now - sent_at) * 1000)

    def table(self, elapsed: float, final: bool = False) -> Table:
        with self.lock:
            now = time.perf_counter()
            recent = sum(1 for t in self.done_times if now - t <= 2.0) / min(2.0, max(elapsed, 1e-3))
            answered = self.results + self.errors
            lat = np.array(self.latencies) if self.latencies else None
            valid_sent = len(self.sent)
            table = Table(title="edgefn demo: digits on sensors/+/digits", show_header=False, min_width=56)
            table.add_column(style="bold")
            table.add_column(justify="right")
            table.add_row("elapsed", f"{elapsed:6.1f} s")
            table.add_row("events sent (valid + malformed)", f"{valid_sent} + {self.bad_sent}")
            table.add_row("results received", str(self.results))
            table.add_row("errors reported (edgefn/errors/digits)", str(self.errors))
            if final:
                table.add_row("events/s (whole run)", f"{answered / max(elapsed, 1e-3):,.0f}")
            else:
                table.add_row("events/s (last 2 s)", f"{recent:,.0f}")
            table.add_row("latency p50 / p99", "-" if lat is None else f"{np.percentile(lat, 50):.2f} / {np.percentile(lat, 99):.2f} ms")
            table.add_row("accuracy so far", f"{self.correct / self.results:.3f}" if self.results else "-")
            table.add_row("ran on", ", ".join(f"{k}: {v}" for k, v in sorted(self.ran_on.items())) or "-")
            outstanding = valid_sent - self.results
            table.add_row("lost" if final else "in flight", str(outstanding))
            return table

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _sensor(port: int, monitor: Monitor, rate: float, devices: int, stop: threading.Event) -> None:
    x, y = _digits()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgefn-demo-sensor-{os.getpid()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    interval, n = 1.0 / rate, 0
    next_at = time.perf_counter()
    while not stop.is_set():
        device = f"sensor-{n % devices}"
        if n % BAD_EVERY == BAD_EVERY - 1:
            payload = _BAD_PAYLOADS[(n // BAD_EVERY) % len(_BAD_PAYLOADS)]
            with monitor.lock:
                monitor.bad_sent += 1
        else:
            i = n % len(y)
            event_id = f"demo-{n}"
            payload = json.dumps({"id": event_id, "pixels": x[i].tolist()}).encode()
            with monitor.lock:
                monitor.sent[event_id] = (time.perf_counter(), int(y[i]))
        client.publish(f"sensors/{device}/digits", payload, qos=1)
        n += 1
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            stop.wait(delay)
    client.loop_stop()
    client.disconnect()


def _wait_healthy(port: int, daemon: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise EdgefnError(f"the daemon exited with status {daemon.returncode} (see its log above)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if json.loads(resp.read()).get("status") == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise EdgefnError(f"the daemon was not healthy within {timeout:g} s")


def run_demo(duration: float | None, rate: float, devices: int, console: Console) -> int:
    if not (FUNCTION / "edgefn.toml").exists() or not (MODELS / "digits" / "model.json").exists():
        raise EdgefnError("the demo needs examples/functions/digits and models/digits from the edgefn repository")
    if needs_build(FUNCTION, load_manifest(FUNCTION)):
        with console.status("building the digits function (componentize-py, about 10 s)"):
            build(FUNCTION)
    metrics_port = free_port()
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edgefn-demo-") as state:
        cmd = [sys.executable, "-m", "edgefn", "run", "--broker", broker.url, "--functions", str(FUNCTION),
               "--models", str(MODELS), "--state-dir", state, "--metrics-port", str(metrics_port),
               "--client-id", f"edgefn-demo-{os.getpid()}", "--no-build", "--log-level", "error"]
        daemon = subprocess.Popen(cmd, start_new_session=True)  # Ctrl-C stops it in order, through us
        monitor = Monitor(broker.port)
        stop = threading.Event()
        try:
            with console.status("starting the daemon"):
                _wait_healthy(metrics_port, daemon, timeout=60)
            console.print(f"broker {broker.url}, daemon pid {daemon.pid}, metrics http://127.0.0.1:{metrics_port}/metrics")
            sensor = threading.Thread(target=_sensor, args=(broker.port, monitor, rate, devices, stop), daemon=True)
            start = time.perf_counter()
            sensor.start()
            try:
                # A terminal gets the live table; a log (CI, a pipe) gets a table every 10 s.
                live = Live(monitor.table(0.0), console=console, refresh_per_second=4) if console.is_terminal else None
                with live or contextlib.nullcontext():
                    last_print = start
                    while duration is None or time.perf_counter() - start < duration:
                        time.sleep(0.25)
                        now = time.perf_counter()
                        if live is not None:
                            live.update(monitor.table(now - start))
                        elif now - last_print >= 10:
                            console.print(monitor.table(now - start))
                            last_print = now
                        if daemon.poll() is not None:
                            raise EdgefnError(f"the daemon exited with status {daemon.returncode}")
            except KeyboardInterrupt:
                console.print("stopping...")
            stop.set()
            sensor.join()
            settle = time.monotonic() + 10
            while time.monotonic() < settle and monitor.results < len(monitor.sent):
                time.sleep(0.1)
            elapsed = time.perf_counter() - start
        finally:
            stop.set()
            stop_gracefully(daemon)
            monitor.close()
        console.print(monitor.table(elapsed, final=True))
        lost = len(monitor.sent) - monitor.results
        console.print(f"daemon exited with status {daemon.returncode}; {lost} events lost")
        return 0 if lost == 0 and daemon.returncode == 0 else 1
