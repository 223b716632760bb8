"""Overload benchmark: local capacity, hand-off to the cloud past it, and a cloud that dies mid-run.

One private mosquitto, `edgefn cloud serve --delay-ms D` as the cloud endpoint (a child process on
this machine), and `edgefn run` with the digits-cnn function pinned to the fp32 CNN (about 1 ms an
image), all on loopback. With --pin (the default where this process may use two CPUs or more) the
endpoint runs on CPUs of its own (taskset: the second half of this process's CPUs, or
--endpoint-cpus) and everything else (this process, the broker, the daemon) on the rest: the hand-off
then adds the endpoint's cores to the device's, as a cloud would, instead of taking the device's.

  capacity C      a burst of --burst events with hand-off off: events answered per second.
  C_endpoint      the same burst with --offload always: what the endpoint answers on its own CPUs
                  (the daemon still runs the guest); goodput is also compared with C + C_endpoint
                  (target 0.9).
  unloaded        --serial events one at a time: the p50/p99 latency of a lone event.
  3C offered      --factor x C events/s for --seconds with hand-off on (on-overload): goodput, the p99
                  of the events served here against the unloaded p99 (target within 2x), where each
                  ran, lost (target 0; goodput target 2.5 C).
  cloud killed    the same load; the endpoint is SIGKILLed a third of the way in and started again at
                  two thirds: lost (target 0), and answers from the cloud after the restart.

  micro-batching  the capacity burst again with --batch-max 1 (off) and 16 (on), hand-off off, for the
                  function as it is (its guest already hands up to 32 queued events to one infer call)
                  and for a per-event copy of it (max_batch 1, 8 instances: concurrent calls of one row
                  each, where coalescing is the only batching); events/s off and on, their ratio
                  (target 1.5x; medians of --batching-rounds rounds, off and on alternating), the
                  infer calls per inference from /metrics, and the model alone in onnxruntime at
                  batch 1 and 16 (rows/s), which bounds what stacking can gain.

    .venv/bin/python bench/overload.py [--delay-ms 20] [--seconds 10] [--factor 3] [--batching-only]
                                       [--no-batching] [--batching-rounds 3] [--no-pin]
                                       [--endpoint-cpus 1] [--json-only]

Results also go to bench/results/overload.json (overload-batching.json with --batching-only).
Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (child processes, payloads, digits images)

from edgefn.mqtt.local_broker import LocalBroker, free_port  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "overload.json"
FUNCTION = e2e.ROOT / "examples" / "functions" / "digits-cnn"
TOPIC = "sensors/bench/digits-cnn"


class Results:
    """The subscriber of results (MQTT 5, large Receive Maximum: it must not be where results get lost)."""

    def __init__(self, port: int):
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}
        self.got: dict[str, tuple[float, str]] = {}  # event id -> (latency s, ran_on)
        self.client = e2e.results_subscriber(port, "results/+/digits-cnn", self._message, "bench-overload")
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-overload-pub-{os.getpid()}",
                               protocol=mqtt.MQTTv5)
        self.pub.max_inflight_messages_set(0)
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()

    def _message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        doc = json.loads(msg.payload)
        with self.lock:
            sent = self.sent.get(doc["event_id"])
            if sent is not None and doc["event_id"] not in self.got:
                self.got[doc["event_id"]] = (now - sent, doc["ran_on"])

    def send(self, event_id: str, pixels: list[int]) -> None:
        with self.lock:
            self.sent[event_id] = time.perf_counter()
        self.pub.publish(TOPIC, e2e._payload(event_id, pixels), qos=1)

    def wait(self, ids: list[str], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            with self.lock:
                if all(i in self.got for i in ids):
                    return
            time.sleep(0.05)

    def close(self) -> None:
        for client in (self.client, self.pub):
            client.loop_stop()
            client.disconnect()


def _daemon(name: str, broker: LocalBroker, workdir: Path, *extra: str) -> e2e.System:
    return e2e.edgefn_run(name, broker.url, workdir, [FUNCTION], "--model-variant", "digits-cnn=fp32", *extra)


def _cloud(workdir: Path, port: int, delay_ms: float, cpus: list[int] | None = None) -> e2e.System:
    pinned = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    return e2e.System("cloud", [*pinned, sys.executable, "-m", "edgefn.cli", "cloud", "serve", "--models",
                                str(e2e.MODELS), "--port", str(port), "--delay-ms", str(delay_ms),
                                "--log-level", "warning"], workdir)


def split_cpus(args: argparse.Namespace) -> tuple[list[int], list[int]] | None:
    """(the device's CPUs, the endpoint's) with --pin, None without: the endpoint gets --endpoint-cpus, else
    the second half of the CPUs this process may use."""
    if not args.pin:
        return None
    mine = sorted(os.sched_getaffinity(0))
    endpoint = [int(c) for c in args.endpoint_cpus.split(",")] if args.endpoint_cpus else mine[len(mine) // 2:]
    device = [c for c in mine if c not in endpoint]
    if not device or not endpoint or shutil.which("taskset") is None:
        raise e2e.BenchError(f"cannot pin the endpoint apart: CPUs {mine}, endpoint {endpoint}, taskset "
                             f"{'found' if shutil.which('taskset') else 'missing'} (--no-pin runs them together)")
    return device, endpoint


def _ready(results: Results, images: list[list[int]], prefix: str) -> None:
    for n in range(600):
        event_id = f"{prefix}-probe-{n}"
        results.send(event_id, images[0])
        results.wait([event_id], 0.5)
        with results.lock:
            if event_id in results.got:
                return
    raise e2e.BenchError(f"{prefix}: the daemon never answered")


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def _offer(results: Results, images: list[list[int]], prefix: str, rate: float, seconds: float,
           during: list[tuple[float, Any]] = ()) -> list[str]:
    """Publish at `rate` events/s for `seconds`, calling each `during` action at its fraction of the run."""
    ids, start, pending = [], time.perf_counter(), sorted(during, key=lambda a: a[0])
    n = int(rate * seconds)
    for i in range(n):
        due = start + i / rate
        while pending and time.perf_counter() - start >= pending[0][0] * seconds:
            pending.pop(0)[1]()
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        event_id = f"{prefix}-{i}"
        results.send(event_id, images[i % len(images)])
        ids.append(event_id)
    return ids


def _summary(results: Results, ids: list[str]) -> dict[str, Any]:
    """Where the events ran, their latency, and the goodput: answers per second from the first event
    sent to the last answer received."""
    with results.lock:
        got = {i: results.got[i] for i in ids if i in results.got}
        first = min((results.sent[i] for i in ids), default=0.0)
        last = max((results.sent[i] + got[i][0] for i in got), default=first)
    local = [lat for lat, where in got.values() if where == "local"]
    cloud = [lat for lat, where in got.values() if where == "cloud"]
    return {"sent": len(ids), "answered": len(got), "lost": len(ids) - len(got), "ran_local": len(local),
            "ran_cloud": len(cloud), "goodput_eps": len(got) / max(last - first, 1e-9),
            "local_p50_ms": _percentile(local, 50), "local_p99_ms": _percentile(local, 99),
            "cloud_p50_ms": _percentile(cloud, 50), "cloud_p99_ms": _percentile(cloud, 99)}


def _burst(results: Results, images: list[list[int]], prefix: str, n: int) -> float:
    """Events answered per second for `n` events published at once (the daemon saturated)."""
    start = time.perf_counter()
    ids = [f"{prefix}-{i}" for i in range(n)]
    for i, event_id in enumerate(ids):
        results.send(event_id, images[i % len(images)])
    results.wait(ids, 120)
    with results.lock:
        last = max((results.sent[i] + results.got[i][0] for i in ids if i in results.got), default=start)
        answered = len([i for i in ids if i in results.got])
    return answered / max(last - start, 1e-9)


def _per_event_copy(workdir: Path) -> Path:
    """The function with handle-batch off (max_batch 1) and 8 instances: one infer call of one row per
    event, several at once."""
    folder = workdir / "per-event" / FUNCTION.name
    shutil.copytree(FUNCTION, folder)
    manifest = folder / "edgefn.toml"
    text = re.sub(r"(?m)^instances = \d+$", "instances = 8", manifest.read_text())
    manifest.write_text(text.replace("[limits]\n", "[limits]\nmax_batch = 1\n", 1))
    return folder


def _batch_histogram(metrics_port: int) -> tuple[float, float]:
    """(inference runs, infer calls they served) of the daemon's digits-cnn runs here, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for part in ("count", "sum"):
        match = re.search(rf'^edgefn_inference_batch_calls_{part}{{model="digits-cnn",where="local"}} (\S+)$', text, re.M)
        found[part] = float(match.group(1)) if match else 0.0
    return found["count"], found["sum"]


def _model_alone(model: str, seconds: float = 2.0) -> dict[str, float]:
    """Rows per second of a model's fp32 variant in onnxruntime alone (one thread, as the daemon runs it) at a
    batch of 1 and of 16 (the model loaded once)."""
    from edgefn.inference.registry import ModelRegistry

    backend = ModelRegistry([e2e.MODELS], variants={model: "fp32"}).get(model)
    images = e2e._digits()[0]
    speeds = {}
    for rows in (1, 16):
        x = np.asarray(images[:rows], dtype=np.float32)
        backend.run([x])
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            backend.run([x])
            runs += 1
        speeds[f"batch_{rows}"] = runs * rows / (time.perf_counter() - start)
    return speeds


def _saturated(name: str, function: Path, batch_max: str, broker: LocalBroker, workdir: Path, results: Results,
               images: list[list[int]], burst: int) -> tuple[float, float]:
    """(events/s, infer calls per inference) of a burst through a daemon of its own, hand-off off."""
    metrics_port = free_port()
    daemon = e2e.edgefn_run(name, broker.url, workdir, [function], "--model-variant", "digits-cnn=fp32",
                            "--offload", "never", "--batch-max", batch_max, "--batch-wait-ms", "2",
                            "--metrics-port", str(metrics_port))
    daemon.start()
    try:
        _ready(results, images, name)
        before = _batch_histogram(metrics_port)
        eps = _burst(results, images, f"{name}-burst", burst)
        after = _batch_histogram(metrics_port)
    finally:
        daemon.stop()
    runs, calls = after[0] - before[0], after[1] - before[1]
    return eps, calls / runs if runs else float("nan")


def batching(args: argparse.Namespace, broker: LocalBroker, workdir: Path, results: Results,
             images: list[list[int]]) -> dict[str, Any]:
    """Micro-batching off, then on, at saturation, for the function as it is and for a per-event copy;
    off and on alternate for --batching-rounds rounds (the cores are shared: one round is noise), and
    the medians are compared."""
    # The CNN costs per row what it costs alone; the MLP (digits) is where stacking pays, for comparison.
    doc: dict[str, Any] = {"model_alone_rows_per_s": _model_alone("digits-cnn"),
                           "mlp_alone_rows_per_s": _model_alone("digits"),
                           "rounds": args.batching_rounds}
    for shape, function in (("as_is", FUNCTION), ("per_event", _per_event_copy(workdir))):
        measured: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        for n in range(args.batching_rounds):
            for mode, batch_max in (("off", "1"), ("on", "16")):
                measured[mode].append(_saturated(f"batch-{shape}-{mode}-{n}", function, batch_max, broker, workdir,
                                                 results, images, args.burst))
        figures: dict[str, Any] = {
            mode: {"events_per_s": float(np.median([eps for eps, _ in runs])),
                   "each_events_per_s": [eps for eps, _ in runs],
                   "calls_per_inference": float(np.median([calls for _, calls in runs]))}
            for mode, runs in measured.items()}
        figures["ratio_on_over_off"] = figures["on"]["events_per_s"] / figures["off"]["events_per_s"]
        doc[shape] = figures
    doc["target_ratio_min"] = 1.5
    return doc


def run(args: argparse.Namespace) -> dict[str, Any]:
    e2e.ensure_built(FUNCTION)
    images, _labels = e2e._digits()
    doc: dict[str, Any] = {"benchmark": "bench/overload.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "config": {"delay_ms": args.delay_ms, "seconds": args.seconds, "factor": args.factor}}
    cpus = split_cpus(args)
    if cpus is not None:  # this process, and what it starts but the endpoint (the broker, the daemon)
        os.sched_setaffinity(0, cpus[0])
        doc["config"]["device_cpus"], doc["config"]["endpoint_cpus"] = cpus
    with LocalBroker(extra_config="max_queued_messages 100000\n") as broker, \
            tempfile.TemporaryDirectory(prefix="edgefn-overload-") as tmp:
        workdir, results = Path(tmp), Results(broker.port)
        try:
            if not args.batching_only:
                _overload(args, doc, broker, workdir, results, images, cpus[1] if cpus else None)
            if not args.no_batching:
                doc["batching"] = batching(args, broker, workdir, results, images)
        finally:
            results.close()
    return doc


def _overload(args: argparse.Namespace, doc: dict[str, Any], broker: LocalBroker, workdir: Path, results: Results,
              images: list[list[int]], endpoint_cpus: list[int] | None) -> None:
    """Capacity here and on the endpoint, 3C offered with hand-off, and the cloud killed mid-run, into `doc`."""
    port = free_port()
    cloud = _cloud(workdir, port, args.delay_ms, endpoint_cpus)
    try:
        # 1. local capacity and the unloaded latency, hand-off off
        local = _daemon("local", broker, workdir, "--offload", "never")
        local.start()
        try:
            _ready(results, images, "local")
            ids = [f"serial-{i}" for i in range(args.serial)]
            for i, event_id in enumerate(ids):
                results.send(event_id, images[i % len(images)])
                results.wait([event_id], 5)
            doc["unloaded"] = _summary(results, ids)
            capacity = doc["capacity_eps"] = _burst(results, images, "burst", args.burst)
        finally:
            local.stop()
        # 2. the endpoint's capacity: everything handed off
        cloud.start()
        alone = _daemon("endpoint", broker, workdir, "--cloud", f"http://127.0.0.1:{port}", "--offload", "always")
        alone.start()
        try:
            _ready(results, images, "endpoint")
            doc["endpoint_capacity_eps"] = _burst(results, images, "endpoint-burst", args.burst)
        finally:
            alone.stop()
        # 3. offered load factor x C, hand-off on
        daemon = _daemon("handoff", broker, workdir, "--cloud", f"http://127.0.0.1:{port}")
        daemon.start()
        try:
            _ready(results, images, "handoff")
            rate = args.factor * capacity
            ids = _offer(results, images, "load", rate, args.seconds)
            results.wait(ids, 120)
            doc["overload"] = {"offered_eps": rate, **_summary(results, ids)}
            # 4. the same with the cloud killed a third of the way in, started again at two thirds
            restarted_at: list[float] = []

            def kill() -> None:
                if cloud.proc is not None:
                    cloud.proc.send_signal(signal.SIGKILL)
                    cloud.proc.wait()
                    cloud.proc = None

            def restart() -> None:
                cloud.start()
                restarted_at.append(time.perf_counter())

            ids = _offer(results, images, "kill", rate, args.seconds, [(1 / 3, kill), (2 / 3, restart)])
            results.wait(ids, 180)
            with results.lock:
                after = sum(1 for i in ids if i in results.got and results.got[i][1] == "cloud"
                            and restarted_at and results.sent[i] > restarted_at[0])
            doc["cloud_killed"] = {**_summary(results, ids), "cloud_answers_after_restart": after}
        finally:
            daemon.stop()
    finally:
        cloud.stop()
    unloaded_p99 = doc["unloaded"]["local_p99_ms"]
    over = doc["overload"]
    doc["summary"] = {
        "capacity_eps": doc["capacity_eps"],
        "local_p99_over_unloaded_p99": over["local_p99_ms"] / unloaded_p99 if unloaded_p99 else float("nan"),
        "endpoint_capacity_eps": doc["endpoint_capacity_eps"],
        "goodput_over_capacity": over["goodput_eps"] / doc["capacity_eps"],
        "goodput_over_both_capacities": over["goodput_eps"] / (doc["capacity_eps"] + doc["endpoint_capacity_eps"]),
        "lost": over["lost"] + doc["cloud_killed"]["lost"],
        "targets": {"local_p99_ratio_max": 2.0, "goodput_ratio_min": 2.5, "goodput_over_both_min": 0.9,
                    "lost_max": 0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added delay of the cloud endpoint")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each loaded run")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of capacity")
    parser.add_argument("--burst", type=int, default=2000, help="events in the capacity burst")
    parser.add_argument("--serial", type=int, default=200, help="lone events for the unloaded latency")
    parser.add_argument("--batching-rounds", type=int, default=3, help="off/on rounds of the micro-batching part")
    parser.add_argument("--batching-only", action="store_true", help="measure only micro-batching off vs on")
    parser.add_argument("--no-batching", action="store_true", help="skip the micro-batching part")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) >= 2,
                        help="the endpoint on CPUs of its own (taskset), the rest on the others")
    parser.add_argument("--endpoint-cpus", help="the endpoint's CPUs, e.g. 1 or 4,5,6,7 (default: the second half)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    doc = run(args)
    path = RESULTS.with_name("overload-batching.json") if args.batching_only else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json_only:
        print(json.dumps(doc, indent=2))
        return 0
    if not args.batching_only:
        s, over, killed = doc["summary"], doc["overload"], doc["cloud_killed"]
        config = doc["config"]
        if "endpoint_cpus" in config:
            print(f"pinned: device (daemon, broker, load) on CPUs {config['device_cpus']}, endpoint on "
                  f"{config['endpoint_cpus']}")
        print(f"capacity here: {s['capacity_eps']:,.0f} events/s; unloaded p50/p99 "
              f"{doc['unloaded']['local_p50_ms']:.2f}/{doc['unloaded']['local_p99_ms']:.2f} ms; everything "
              f"handed off: {s['endpoint_capacity_eps']:,.0f} events/s")
        print(f"offered {over['offered_eps']:,.0f}/s for {args.seconds:g} s: goodput {over['goodput_eps']:,.0f}/s "
              f"({s['goodput_over_capacity']:.2f} C, target >= 2.5; {s['goodput_over_both_capacities']:.2f} x "
              f"(C + C_endpoint), target >= 0.9), ran here {over['ran_local']}, on the cloud "
              f"{over['ran_cloud']}, lost {over['lost']}; local p99 {over['local_p99_ms']:.1f} ms "
              f"({s['local_p99_over_unloaded_p99']:.1f}x unloaded, target <= 2)")
        print(f"cloud SIGKILLed at 1/3 and restarted at 2/3: answered {killed['answered']}/{killed['sent']}, lost "
              f"{killed['lost']}, cloud answers after the restart {killed['cloud_answers_after_restart']}")
    if args.no_batching:
        print(f"results written to {path.relative_to(e2e.ROOT)}")
        return 0
    batched = doc["batching"]
    for key, label in (("model_alone_rows_per_s", "CNN"), ("mlp_alone_rows_per_s", "MLP (digits)")):
        alone = batched[key]
        print(f"the {label} alone in onnxruntime: {alone['batch_1']:,.0f} rows/s at batch 1, "
              f"{alone['batch_16']:,.0f} at 16 ({alone['batch_16'] / alone['batch_1']:.2f}x)")
    for shape, label in (("as_is", "function as it is (guest batches of up to 32)"),
                         ("per_event", "per-event copy (max_batch 1, 8 instances)")):
        f = batched[shape]
        print(f"micro-batching, {label}: off {f['off']['events_per_s']:,.0f} events/s, on "
              f"{f['on']['events_per_s']:,.0f} (medians of {batched['rounds']}: {f['ratio_on_over_off']:.2f}x, target >= 1.5; "
              f"{f['on']['calls_per_inference']:.2f} calls per inference)")
        if f["on"]["calls_per_inference"] < 1.05:
            print("  (on, hardly a call was stacked: the difference between off and on is the shared cores' noise)")
    print(f"results written to {path.relative_to(e2e.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
