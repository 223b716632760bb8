"""Priority benchmark: a high-priority stream beside a low-priority one that overloads the device 3x.

One stock mosquitto (bench/soak.py's `Broker`, stock settings) and one `edgefn run` child process
with two copies of the digits example (the same component and model under other names):

  alarm      triggered by sensors/+/alarm,     `priority = "high"`
  telemetry  triggered by sensors/+/telemetry, `priority = "low"` (in the shed mode also `shed = true`)

So the daemon holds two events sessions (`<client id>` is not opened: no normal function) and the
results session. Steps, for each mode:

  1. alarms alone: 20 events/s for --duration s; latency = publish to its result at a subscriber in
     this process (p50, p99).
  2. the capacity C of telemetry: a burst of 3,000 events (in the first mode only; the second reuses it).
  3. the overload: three sensors send telemetry at 3 C for --duration s while alarms are sent at
     20 events/s as in 1. Alarm p50/p99 under load, and their ratio to the alarms alone [target: p99
     ratio <= 2]; telemetry p50/p99 (results, or shed notices on edgefn/errors/telemetry), how many
     were shed (the daemon's edgefn_events_handled_total{outcome="shed"}), and lost: events delivered
     to the daemon that got no answer [target 0] (queue mode: after the backlog drained). A stock
     broker drops what it cannot queue for a client that is behind (`max_queued_messages`): those
     are reported apart, as dropped by the broker.

Modes (--modes): `queue` (telemetry may not be shed: its backlog is served after the overload) and
`shed` (telemetry past its latency budget is answered with reason shed). This process subscribes to
every result, so its own MQTT client shares the cores with the daemon: the figures are pessimistic
on a 2-core machine, and noisy where other work runs beside them.

    .venv/bin/python bench/priority.py [--duration 20] [--modes queue,shed] [--json-only]

Takes about 2-4 minutes. Results also go to bench/results/priority.json. Exit status 0 whatever the
figures; 1 when a mode could not run (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402
import soak  # noqa: E402  (the broker, the daemon as a child process, sensors, latency)

from edgefn.functions.sandbox import Runtime  # noqa: E402
from edgefn.mqtt.local_broker import free_port  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "priority.json"
HIGH_TOPIC, LOW_TOPIC = "sensors/bench/alarm", "sensors/bench/telemetry"
MODES = ("queue", "shed")
TARGETS = {"p99_ratio_max": 2.0, "lost_max": 0}


def _daemon(workdir: Path, name: str, broker: soak.Broker, shed: bool) -> soak.Daemon:
    fns = workdir / name / "fns"
    alarm, models = soak.digits_copy(fns, "alarm", 'priority = "high"')
    telemetry, _ = soak.digits_copy(fns, "telemetry", 'priority = "low"' + ("\nshed = true" if shed else ""))
    state = workdir / name
    (workdir / "components").mkdir(exist_ok=True)
    (state / "components").symlink_to(workdir / "components")
    port = free_port()
    return soak.Daemon(e2e.edgefn_run(name, broker.url, workdir, [alarm, telemetry], "--models", str(models),
                                      "--metrics-port", str(port), log_level="warning"), port)


def _handled(daemon: soak.Daemon) -> dict[str, int]:
    """The daemon's own count of events answered, by function and outcome (ok, shed, ...)."""
    text = daemon._get("/metrics", 5).decode()
    return {f"{fn}:{outcome}": int(float(n)) for fn, outcome, n in re.findall(
        r'^edgefn_events_handled_total\{function="([^"]+)",outcome="([^"]+)"\} (\S+)$', text, re.M)}


class Arrivals:
    """The telemetry answers (results and shed notices), on a subscriber of their own: the broker
    writes to each client in one stream, and the alarms' results must not queue behind these in
    the stream to the probes' subscriber (a measurement's artefact, not the daemon's)."""

    def __init__(self, port: int):
        self.lock = threading.Lock()
        self.arrived: dict[str, float] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-priority-low-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 65535  # never where answers are lost
        self.client.connect("127.0.0.1", port, properties=props)
        self.client.subscribe([("results/+/telemetry", 1), ("edgefn/errors/telemetry", 1)])
        self.client.loop_start()
        if not subscribed.wait(10):
            raise e2e.BenchError("the telemetry subscriber did not subscribe")

    def _message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        found = _EVENT_ID.search(msg.payload)  # no JSON parse: this process shares the cores
        if found:
            with self.lock:
                self.arrived.setdefault(found.group(1).decode(), now)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


_EVENT_ID = re.compile(rb'"event_id": "([^"]+)"')


def _alarms(broker: soak.Broker, clients: e2e.Clients, ctx: soak.Context, prefix: str, seconds: float) -> dict:
    sent_at: dict[str, float] = {}
    soak._offer(broker.port, HIGH_TOPIC, prefix, int(soak.PROBE_RATE * seconds), ctx.payload, soak.PROBE_RATE,
                seconds, clients, sent_at=sent_at)
    return sent_at


def one_mode(ctx: soak.Context, broker: soak.Broker, clients: e2e.Clients, arrivals: Arrivals, mode: str,
             capacity: float | None) -> dict:
    seconds = ctx.args.duration
    daemon = _daemon(ctx.workdir, f"priority-{mode}", broker, shed=mode == "shed")
    daemon.start(clients, ctx.images, HIGH_TOPIC)
    try:
        clients.sub.subscribe("results/+/telemetry", qos=1)  # ready, and its capacity, counted there
        time.sleep(0.5)
        e2e._wait_ready(clients, daemon.system, LOW_TOPIC, ctx.images)
        if capacity is None:
            capacity = e2e._burst(clients, daemon.system, LOW_TOPIC, ctx.images, ctx.labels, soak.CAPACITY_BURST,
                                  {})["throughput_eps"]
        clients.sub.unsubscribe("results/+/telemetry")  # from now on on a subscriber of their own
        time.sleep(0.5)
        clients.reset()
        alone = soak._latency(clients, _alarms(broker, clients, ctx, f"{mode}-alone", seconds))
        clients.reset()
        received_before = daemon.received()
        rate = 3 * capacity
        low_sent: dict[str, float] = {}
        offered: dict[str, Any] = {}
        flooder = threading.Thread(target=lambda: offered.update(soak._offer(
            broker.port, LOW_TOPIC, f"{mode}-low", int(rate * seconds) + 1, ctx.payload, rate, seconds, clients,
            threads=3, sent_at=low_sent)), daemon=True)
        flooder.start()
        during = _alarms(broker, clients, ctx, f"{mode}-during", seconds)
        flooder.join()
        high = soak._latency(clients, during)
        low = soak._latency(arrivals, low_sent, wait_s=3 * seconds + 60)  # queue mode: the backlog drains
        low["events"] = low.pop("probes")
        handled = _handled(daemon)
        # A stock broker drops what it cannot queue for a client that is behind (max_queued_messages):
        # what the daemon must answer is what reached it.
        delivered = int(daemon.received() - received_before) - len(during)
        low["lost"] = max(0, min(len(low_sent), delivered) - low["answered"])
        doc = {"low_delivered": delivered, "broker_dropped": max(0, int(offered.get("broker_acked") or 0) - delivered),
               "capacity_eps": capacity, "low_offered_eps": offered.get("offered_eps"),
               "low_sent": offered.get("sent"), "low_broker_acked": offered.get("broker_acked"),
               "daemon_received": daemon.received(), "daemon_handled": handled,
               "alone": alone, "high": high, "low": low, "shed": handled.get("telemetry:shed", 0),
               "p99_ratio": high["p99_ms"] / alone["p99_ms"], "lost": high["lost"] + alone["lost"] + low["lost"]}
    finally:
        stopped = daemon.stop()
    return {**doc, **stopped}


def run(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    e2e.ensure_built(e2e.FUNCTION)
    images, labels = e2e._digits()
    doc: dict[str, Any] = {"benchmark": "bench/priority.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "config": {"duration": args.duration, "modes": args.modes, "broker": "stock"},
                           "targets": TARGETS}
    capacity: float | None = None
    with tempfile.TemporaryDirectory(prefix="edgefn-priority-") as tmp:
        ctx = soak.Context(args, Path(tmp), images, labels)
        # Compiled once, outside the measured daemons (both copies are the same bytes: one cache entry).
        with Runtime(ctx.workdir / "components") as runtime:
            runtime.load(e2e.FUNCTION / "build" / "digits.wasm")
        for mode in args.modes:
            say(f"{mode} mode")
            with soak.Broker("stock", ctx.workdir) as broker:
                clients = e2e.Clients(broker.port)
                clients.sub.subscribe([("results/+/alarm", 1), ("edgefn/errors/alarm", 1)])
                arrivals = Arrivals(broker.port)
                try:
                    result = soak.attempt(one_mode, ctx, broker, clients, arrivals, mode, capacity)
                    capacity = result.get("capacity_eps", capacity)
                finally:
                    arrivals.close()
                    clients.close()
            doc[mode] = result
    e2e.write_results(RESULTS, doc)
    return doc


ROWS = [("telemetry capacity C (events/s)", "capacity_eps", "{:,.0f}"),
        ("telemetry offered, 3 sensors (events/s)", "low_offered_eps", "{:,.0f}"),
        ("alarms alone p50 / p99 (ms)", ("alone.p50_ms", "alone.p99_ms"), "{:.1f}"),
        ("alarms under 3x load p50 / p99 (ms)", ("high.p50_ms", "high.p99_ms"), "{:.1f}"),
        ("alarm p99 under load / alone [<= 2]", "p99_ratio", "{:.2f}"),
        ("telemetry p50 / p99 (ms)", ("low.p50_ms", "low.p99_ms"), "{:,.0f}"),
        ("telemetry sent / delivered to the daemon", ("low_sent", "low_delivered"), "{:,}"),
        ("  dropped by the stock broker before the daemon", "broker_dropped", "{:,}"),
        ("telemetry shed (answered with reason shed)", "shed", "{:,}"),
        ("lost: delivered, never answered [0]", "lost", "{:,}")]


def _get(doc: dict, path: str) -> Any:
    for key in path.split("."):
        doc = doc.get(key, {}) if isinstance(doc, dict) else {}
    return doc if doc != {} else None


def _print(doc: dict[str, Any]) -> None:
    modes = [m for m in doc["config"]["modes"] if m in doc]
    print(f"{'':46}" + "".join(f"{m:>22}" for m in modes))
    for label, key, fmt in ROWS:
        cells = []
        for m in modes:
            keys = key if isinstance(key, tuple) else (key,)
            values = [_get(doc[m], k) for k in keys]
            cells.append(" / ".join("-" if v is None else fmt.format(v) for v in values))
        print(f"{label:46}" + "".join(f"{c:>22}" for c in cells))
    for m in modes:
        if "error" in doc[m]:
            print(f"{m}: failed: {doc[m]['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each stream (alone, under load)")
    parser.add_argument("--modes", type=lambda t: [m for m in t.split(",") if m in MODES] or list(MODES),
                        default=list(MODES), help="queue,shed")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    doc = run(args, (lambda _m: None) if args.json_only else (lambda m: print(m, flush=True)))
    if args.json_only:
        print(json.dumps(doc, indent=2))
    else:
        _print(doc)
    return 1 if any("error" in doc.get(m, {}) for m in args.modes) else 0


if __name__ == "__main__":
    sys.exit(main())
