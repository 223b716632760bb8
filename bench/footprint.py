"""Footprint benchmark: the daemon's memory and start-up on a stock broker, as a small board would see them.

For each case (digits alone; digits and digits-cnn, the two example functions) a private stock
mosquitto (`LocalBroker()`) and `edgefn run` as a child process, with its own state dir:

  warm-up   the daemon is started once and stopped: its component cache is warm, and its persistent
            session (with its subscriptions) stays at the broker.
  start     one event per function is published while the daemon is away (the broker keeps them for
            its session), then the daemon is started: the seconds from the spawn to the first answer,
            and to an answer from every function [target <= 1.0 s], and RSS (VmRSS) then.
  events    10,000 events (spread over the functions, at most 1,000 unanswered at once), RSS after
            [<= 100 MB with digits]; 90,000 more, RSS after: growth from 10,000 to 100,000 [<= 5 MB]
            (a leak would show here). Lost = sent - answered [0].
  idle      RSS 35 s later, once the instances made for the load were released (idle_s 30: each function
            keeps min_instances, 1 by default).
  where     the daemon's resident memory by mapping (/proc/PID/smaps) at the end: the heap, Python's
            and the native libraries, wasmtime's compiled code and the guests' linear memories.
  cold      (digits alone) the component cache removed, the daemon started again: the time to the
            first answer and the daemon's peak RSS (VmHWM): compiling happens in a child process, so it
            must not raise the daemon's own peak.

    .venv/bin/python bench/footprint.py [--events 10000] [--more 90000] [--only digits,both] [--json-only]

Takes about 5 minutes. Results also go to bench/results/footprint.json. Exit status 0 whatever the
figures; 1 when a case could not run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (child processes, building, digits images)

from edgefn.mqtt.local_broker import LocalBroker  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "footprint.json"
EXAMPLES = e2e.ROOT / "examples" / "functions"
CASES = {"digits": ["digits"], "both": ["digits", "digits-cnn"]}
TARGETS = {"start_s_max": 1.0, "rss_mb_max": 100.0, "growth_mb_max": 5.0, "lost_max": 0}
WINDOW = 1000  # events unanswered at once, at most
START_TIMEOUT_S = 120.0
WARM_TIMEOUT_S = 300.0  # compiling both example components on 2 busy cores takes a minute or more
IDLE_TIMEOUT_S = 30.0
IDLE_WAIT_S = 35.0  # the example functions' idle_s (30, the default) and the pool keeper's turn


class Results:
    """The answers to every function, by event id."""

    def __init__(self, port: int):
        self.lock = threading.Lock()
        self.answered: set[str] = set()
        self.first: dict[str, float] = {}  # function (the topic's last level) -> perf_counter of its first result
        self.changed = threading.Condition(self.lock)
        self.client = e2e.results_subscriber(port, "results/#", self._message, "bench-footprint-results")

    def _message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        try:
            event_id = json.loads(msg.payload)["event_id"]
        except (ValueError, KeyError, TypeError):
            return
        with self.changed:
            self.answered.add(event_id)
            self.first.setdefault(msg.topic.rsplit("/", 1)[-1], now)
            self.changed.notify_all()

    def count(self) -> int:
        with self.lock:
            return len(self.answered)

    def wait_until(self, condition, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(condition, timeout)

    def reset(self) -> None:
        with self.lock:
            self.answered.clear()
            self.first.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _sensor(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-footprint-sensor-{time.monotonic_ns()}")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def _private(pid: int) -> dict[str, float]:
    """What the daemon holds of its own (RSS counts, besides, the pages of shared libraries and the mapped
    compiled component, which are clean: the kernel can drop them and other processes share them)."""
    rollup = {line.split(":")[0]: int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
    return {"private_mb": _mb(rollup.get("Private_Dirty", 0) + rollup.get("Private_Clean", 0)),
            "anonymous_mb": _mb(rollup.get("Anonymous", 0))}


def where_memory_goes(pid: int) -> dict[str, float]:
    """Resident MB by kind of mapping, from /proc/PID/smaps."""
    kinds: Counter[str] = Counter()
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            name = head[5] if len(head) > 5 else "[anonymous]"
        elif head and head[0] == "Rss:":
            kinds[_kind(name)] += int(head[1])
    return {k: _mb(v) for k, v in kinds.most_common()}


def _kind(path: str) -> str:
    if path in ("[heap]", "[anonymous]"):
        return "heap and anonymous (Python objects, wasmtime's linear memories and compiled code, onnxruntime)"
    if path.startswith("["):
        return "stacks and other"
    if "/components/" in path:
        return "compiled components (mapped)"
    for lib in ("onnxruntime", "wasmtime", "numpy", "sqlite", "python3", "libpython", "ssl", "crypto"):
        if lib in path:
            return f"{lib} (code and data)"
    if path.endswith(".so") or ".so." in path:
        return "other native libraries"
    return "other files"


def _publish_all(sensor: mqtt.Client, results: Results, system: e2e.System, topics: list[str],
                 images: list[list[int]], tag: str, n: int, sent_before: int) -> int:
    """Publish n events (spread over the topics), never more than WINDOW unanswered; return how many answered."""
    for i in range(n):
        if i % 500 == 0:
            system.check()
            results.wait_until(lambda i=i: len(results.answered) >= sent_before + i - WINDOW, IDLE_TIMEOUT_S)
        event_id = f"{tag}-{i}"
        sensor.publish(topics[i % len(topics)], json.dumps({"id": event_id, "pixels": images[i % len(images)]}), qos=1)
    results.wait_until(lambda: len(results.answered) >= sent_before + n, IDLE_TIMEOUT_S + n / 500)
    return results.count() - sent_before


def run_case(name: str, functions: list[str], args: argparse.Namespace, images: list[list[int]],
             say: Any) -> dict[str, Any]:
    paths = [EXAMPLES / f for f in functions]
    for path in paths:
        e2e.ensure_built(path)
    topics = [f"sensors/fp/{f}" for f in functions]
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edgefn-footprint-") as tmp:
        workdir = Path(tmp)
        results, sensor = Results(broker.port), _sensor(broker.port)
        daemon = e2e.edgefn_run(name, broker.url, workdir, paths, log_level="warning")
        try:
            say(f"[bold]{name}[/]: warm-up start (component cache, session at the broker)")
            _warm(daemon, sensor, results, topics, images)
            daemon.stop()
            row = {"functions": functions}
            row.update(_start(daemon, sensor, results, topics, images))
            say(f"  start: first answer {row['start_first_s']:.2f} s, every function {row['start_all_s']:.2f} s, "
                f"RSS {row['rss_first_mb']} MB")
            assert daemon.proc is not None
            pid = daemon.proc.pid
            answered = _publish_all(sensor, results, daemon, topics, images, "a", args.events, results.count())
            row["rss_events_mb"] = _mb(_status_kb(pid, "VmRSS"))
            more = _publish_all(sensor, results, daemon, topics, images, "b", args.more, results.count())
            row["rss_more_mb"] = _mb(_status_kb(pid, "VmRSS"))
            row.update(_private(pid))
            time.sleep(IDLE_WAIT_S)  # the instances made for the load are released after idle_s
            row["rss_idle_mb"] = _mb(_status_kb(pid, "VmRSS"))
            row.update(events=args.events, more=args.more, lost=args.events + args.more - answered - more,
                       growth_mb=round(row["rss_more_mb"] - row["rss_events_mb"], 1),
                       peak_rss_mb=_mb(_status_kb(pid, "VmHWM")), where_mb=where_memory_goes(pid))
            say(f"  after {args.events:,} events RSS {row['rss_events_mb']} MB, after {args.events + args.more:,} "
                f"{row['rss_more_mb']} MB; lost {row['lost']}; idle {IDLE_WAIT_S:g} s later {row['rss_idle_mb']} MB")
            daemon.stop()
            if name == "digits":
                shutil.rmtree(workdir / name / "components", ignore_errors=True)
                cold = _start(daemon, sensor, results, topics, images)
                assert daemon.proc is not None
                row["cold"] = {"start_first_s": cold["start_first_s"],
                               "peak_rss_mb": _mb(_status_kb(daemon.proc.pid, "VmHWM"))}
                say(f"  cold cache: first answer {cold['start_first_s']:.2f} s, "
                    f"daemon peak RSS {row['cold']['peak_rss_mb']} MB")
            return row
        finally:
            daemon.stop()
            sensor.loop_stop()
            results.close()


def _warm(daemon: e2e.System, sensor: mqtt.Client, results: Results, topics: list[str],
          images: list[list[int]]) -> None:
    """Start the daemon (compiling what the cache lacks) and probe until every function has answered."""
    results.reset()
    daemon.start()
    deadline = time.perf_counter() + WARM_TIMEOUT_S
    while not results.wait_until(lambda: len(results.first) >= len(topics), 1.0):
        daemon.check()
        if time.perf_counter() > deadline:
            raise e2e.BenchError(f"not every function answered within {WARM_TIMEOUT_S:g} s:\n{daemon.log_tail()}")
        for topic in topics:
            sensor.publish(topic, json.dumps({"id": f"warm-{time.monotonic_ns()}", "pixels": images[0]}), qos=1)


def _start(daemon: e2e.System, sensor: mqtt.Client, results: Results, topics: list[str],
           images: list[list[int]]) -> dict[str, Any]:
    """Events waiting at the broker, then the daemon started: how long to the answers, and RSS then."""
    results.reset()
    infos = [sensor.publish(t, json.dumps({"id": f"start-{t}-{time.monotonic_ns()}", "pixels": images[0]}), qos=1)
             for t in topics]
    [info.wait_for_publish(10) for info in infos]
    t0 = time.perf_counter()
    daemon.start()
    answered = results.wait_until(lambda: len(results.first) >= 1, START_TIMEOUT_S)
    daemon.check()
    if not answered:
        raise e2e.BenchError(f"no answer within {START_TIMEOUT_S:g} s:\n{daemon.log_tail()}")
    assert daemon.proc is not None
    rss = _status_kb(daemon.proc.pid, "VmRSS")
    results.wait_until(lambda: len(results.first) >= len(topics), START_TIMEOUT_S)
    with results.lock:
        first, every = min(results.first.values()), max(results.first.values())
    return {"start_first_s": round(first - t0, 3), "start_all_s": round(every - t0, 3), "rss_first_mb": _mb(rss)}


def _print(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = doc["cases"]
    t = Table(title="footprint: edgefn run on a stock broker (warm component cache unless said)")
    t.add_column("")
    for name in rows:
        t.add_column(name, justify="right")
    t.add_column("target")

    def cell(row: dict[str, Any], key: str) -> str:
        return str(row.get(key, row.get("error", "-")))

    for key, label, target in (("start_first_s", "start -> first answer (s)", "<= 1.0"),
                               ("start_all_s", "start -> every function answered (s)", ""),
                               ("rss_first_mb", "RSS at the first answer (MB)", ""),
                               ("rss_events_mb", f"RSS after {doc['config']['events']:,} events (MB)", "<= 100 (digits)"),
                               ("rss_more_mb", f"RSS after {doc['config']['events'] + doc['config']['more']:,} (MB)", ""),
                               ("growth_mb", "growth between the two (MB)", "<= 5"),
                               ("private_mb", "of which private to the daemon (MB)", ""),
                               ("anonymous_mb", "of which anonymous (heap, linear memories) (MB)", ""),
                               ("rss_idle_mb", f"RSS idle {IDLE_WAIT_S:g} s later, past idle_s (MB)", ""),
                               ("peak_rss_mb", "peak RSS (MB)", ""), ("lost", "lost", "0")):
        t.add_row(label, *(cell(r, key) for r in rows.values()), target)
    cold = rows.get("digits", {}).get("cold")
    if cold:
        t.add_row("cold cache: start -> first answer (s)", str(cold["start_first_s"]), *[""] * (len(rows) - 1), "")
        t.add_row("cold cache: daemon peak RSS (MB)", str(cold["peak_rss_mb"]), *[""] * (len(rows) - 1),
                  "compiling never raises it")
    console = Console()
    console.print(t)
    for name, row in rows.items():
        if "where_mb" in row:
            console.print(f"[bold]{name}[/]: resident MB by mapping: " +
                          ", ".join(f"{k}: {v}" for k, v in row["where_mb"].items()))
    console.print(f"results written to {RESULTS.relative_to(e2e.ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000, help="events before the first RSS reading")
    parser.add_argument("--more", type=int, default=90_000, help="events after it, before the second")
    parser.add_argument("--only", default=",".join(CASES), help="cases to run")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    if unknown := set(only) - set(CASES):
        parser.error(f"unknown cases: {', '.join(sorted(unknown))} (known: {', '.join(CASES)})")

    def say(msg: str) -> None:
        if not args.json_only:
            from rich.console import Console

            Console(stderr=True).print(msg)

    images, _ = e2e._digits()
    doc: dict[str, Any] = {"benchmark": "bench/footprint.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "config": {"events": args.events, "more": args.more, "window": WINDOW},
                           "targets": TARGETS, "cases": {}}
    failed = False
    for name in only:
        try:
            doc["cases"][name] = run_case(name, CASES[name], args, images, say)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
            if not isinstance(exc, e2e.BenchError):
                traceback.print_exc()
            doc["cases"][name] = {"error": str(exc)}
            failed = True
    e2e.write_results(RESULTS, doc)
    if args.json_only:
        print(json.dumps(doc, indent=2))
    else:
        _print(doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
