"""Where one event's time goes: the daemon's stages, one event at a time, and its CPU per thread under a burst.

bench/e2e.py says how far edgefn is from the plain script; this says where the difference is spent. One
private stock mosquitto (`LocalBroker()`, Nagle on) and `edgefn run` with examples/functions/digits,
started through bench/stage_clock.py (the same daemon, with the methods an event passes through wrapped
to note their start and end on the machine's monotonic clock, which this process shares):

  serial  --serial events (after 50 warm-up) published one at a time at QoS1, each when the previous
          one's result has arrived. For each stage: the median time from the publish to its start, and
          the median time it took. Then the path in parts: the broker's two hops (publish -> the daemon's
          read; the daemon's write -> the subscriber), the daemon's intake (read -> queued), the wait for
          a worker, the guest call without host.infer, host.infer, and the answer's way out.
  burst   --burst events as fast as paho takes them; the CPU time of each thread of the daemon (from
          /proc/PID/task), in microseconds per answered event, and the broker's.

The clock adds about a microsecond per wrapped call; the figures are for finding where time goes, not for
quoting as edgefn's speed (bench/e2e.py is that).

    .venv/bin/python bench/stages.py [--serial 300] [--burst 10000] [--json-only]

Takes about a minute. Results also go to bench/results/stages.json. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the clients, the child process, the digits images)

from edgefn.mqtt.local_broker import LocalBroker  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "stages.json"
CLOCK = Path(__file__).with_name("stage_clock.py")
TOPIC = "sensors/bench-stages/digits"


def _thread_kind(name: str) -> str:
    if name.startswith("paho-mqtt-client-"):
        return "results session" if name.endswith("-results") else "events session"
    if name.startswith("edgefn-digits-"):
        return "worker"
    return name


def _thread_cpu(pid: int) -> dict[str, float]:
    """native thread id -> CPU seconds (user + system) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        cpu[tid] = (int(fields[11]) + int(fields[12])) / tick
    return cpu


def _serial(clients: e2e.Clients, system: e2e.System, images: list[list[int]], labels: list[int],
            n: int) -> list[tuple[float, float | None]]:
    """(published, arrived) perf_counter pairs, one event at a time."""
    sent = []
    for i in range(e2e.WARMUP + n):
        if i % 50 == 0:
            system.check()
        event_id = f"stages-{i}"
        with clients.lock:
            clients.expected[event_id] = labels[i % len(labels)]
            clients.waiting_for = event_id
            clients.answer.clear()
        t0 = time.perf_counter()
        clients.pub.publish(TOPIC, e2e._payload(event_id, images[i % len(images)]), qos=1)
        clients.answer.wait(e2e.SERIAL_TIMEOUT_S)
        with clients.lock:
            sent.append((t0, clients.arrived.get(event_id)))
    return sent[e2e.WARMUP:]


def stage_table(spans: list[list[Any]], sent: list[tuple[float, float | None]]) -> dict[str, Any]:
    """Per stage (and thread kind): the median start after the publish and the median duration, in ms,
    over the events it appeared in; and the path in parts."""
    spans = sorted(spans, key=lambda s: s[2])
    starts = [s[2] for s in spans]
    seen: dict[str, list[tuple[float, float]]] = defaultdict(list)
    parts: dict[str, list[float]] = defaultdict(list)
    answered = [(t0, t1) for t0, t1 in sent if t1 is not None]
    for t0, t1 in answered:
        mine = spans[bisect.bisect_left(starts, t0):bisect.bisect_right(starts, t1)]
        firsts: dict[str, tuple[float, float]] = {}
        for label, thread, start, end in mine:
            key = f"{label} ({_thread_kind(thread)})"
            if key in firsts:  # a second write on the same session (e.g. the PUBACK, then the result)
                key += " again"
            firsts.setdefault(key, (start, end))
            seen[key].append(((start - t0) * 1e3, (end - start) * 1e3))
        read = firsts.get("Client._packet_read (events session)")
        queued = firsts.get("Lane.put (events session)")
        worker = firsts.get("Workers.process (worker)")
        call = firsts.get("FunctionSandbox.handle_batch (worker)")
        infer = firsts.get("FunctionHost.infer (worker)")
        # The result's write: the first on a thread other than the events session's after the call (the
        # worker's own publish writes it, else the results session's thread).
        writes = [e for label, thread, s, e in mine if label in ("Client._packet_write", "PausableClient._write_inline")
                  and _thread_kind(thread) != "events session" and call is not None and s >= call[1]]
        if not (read and queued and worker and call and infer and writes):
            continue
        written = writes[0]
        parts["broker: publish -> the daemon reads it"].append((read[0] - t0) * 1e3)
        parts["daemon: read, journaled, acknowledged, queued"].append((queued[1] - read[0]) * 1e3)
        parts["daemon: queued -> a worker takes it"].append((worker[0] - queued[1]) * 1e3)
        parts["guest call without host.infer (sandbox, boundary, guest)"].append(
            ((call[1] - call[0]) - (infer[1] - infer[0])) * 1e3)
        parts["host.infer (the model)"].append((infer[1] - infer[0]) * 1e3)
        parts["daemon: guest answered -> result written"].append((written - call[1]) * 1e3)
        parts["broker: written -> the subscriber has it"].append((t1 - written) * 1e3)
    rows = [{"stage": key, "events": len(v), "starts_ms": round(statistics.median(s for s, _ in v), 3),
             "takes_ms": round(statistics.median(d for _, d in v), 3)}
            for key, v in seen.items() if len(v) >= len(answered) // 2]
    rows.sort(key=lambda r: r["starts_ms"])
    latency = [(t1 - t0) * 1e3 for t0, t1 in answered]
    return {"events": len(sent), "answered": len(answered),
            "p50_ms": round(statistics.median(latency), 3) if latency else None,
            "stages": rows, "parts_p50_ms": {k: round(statistics.median(v), 3) for k, v in parts.items()}}


def run(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    e2e.ensure_built(e2e.FUNCTION)
    images, labels = e2e._digits()
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edgefn-stages-") as tmp:
        workdir = Path(tmp)
        out = workdir / "spans.json"
        daemon = e2e.edgefn_run("edgefn", broker.url, workdir, [e2e.FUNCTION], log_level="warning",
                                launcher=(str(CLOCK), str(out)))
        clients = e2e.Clients(broker.port)
        try:
            daemon.start()
            e2e._wait_ready(clients, daemon, TOPIC, images)
            say(f"serial: {args.serial} events one at a time")
            sent = _serial(clients, daemon, images, labels, args.serial)
            clients.reset()
            time.sleep(0.3)
            assert daemon.proc is not None and broker._proc is not None
            pid, broker_pid = daemon.proc.pid, broker._proc.pid
            say(f"burst: {args.burst:,} events")
            before, broker_before = _thread_cpu(pid), sum(_thread_cpu(broker_pid).values())
            burst = e2e._burst(clients, daemon, TOPIC, images, labels, args.burst, {})
            after, broker_after = _thread_cpu(pid), sum(_thread_cpu(broker_pid).values())
            names = json.loads(Path(f"{out}.threads").read_text())
        finally:
            daemon.stop()
            clients.close()
        spans = json.loads(out.read_text())["spans"]
    answered = max(burst["answered"], 1)
    per_thread: dict[str, float] = defaultdict(float)
    for tid, cpu in after.items():
        per_thread[names.get(tid, f"thread {tid}")] += cpu - before.get(tid, 0.0)
    cpu_rows = [{"thread": name, "cpu_s": round(s, 3), "us_per_event": round(s / answered * 1e6, 1)}
                for name, s in sorted(per_thread.items(), key=lambda kv: -kv[1]) if s > 0]
    return {"benchmark": "bench/stages.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {"serial": args.serial, "burst": args.burst, "broker": "stock mosquitto"},
            "serial": stage_table(spans, sent),
            "burst": {"events": args.burst, "answered": burst["answered"], "lost": burst["lost"],
                      "throughput_eps": round(burst["throughput_eps"]),
                      "cpu_us_per_event_total": round(sum(r["us_per_event"] for r in cpu_rows), 1),
                      "threads": cpu_rows,
                      "broker_us_per_event": round((broker_after - broker_before) / answered * 1e6, 1)}}


def _print(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    serial = doc["serial"]
    t = Table(title=f"one event at a time, stock broker: p50 {serial['p50_ms']} ms "
                    f"({serial['answered']} of {serial['events']} answered)")
    for col in ("stage (thread)", "starts after the publish (ms, p50)", "takes (ms, p50)"):
        t.add_column(col, justify="left" if col.startswith("stage") else "right")
    for row in serial["stages"]:
        t.add_row(row["stage"], f"{row['starts_ms']:.3f}", f"{row['takes_ms']:.3f}")
    console.print(t)
    p = Table(title="the path in parts (each its own p50, so they need not add up to the p50 above)")
    p.add_column("part")
    p.add_column("ms", justify="right")
    for part, ms in serial["parts_p50_ms"].items():
        p.add_row(part, f"{ms:.3f}")
    console.print(p)
    burst = doc["burst"]
    b = Table(title=f"burst of {burst['events']:,}: {burst['throughput_eps']:,} events/s, lost {burst['lost']}; "
                    f"CPU {burst['cpu_us_per_event_total']} us per event in the daemon, "
                    f"{burst['broker_us_per_event']} in the broker")
    for col in ("thread", "CPU s", "us per event"):
        b.add_column(col, justify="left" if col == "thread" else "right")
    for row in burst["threads"]:
        b.add_row(row["thread"], f"{row['cpu_s']:.2f}", f"{row['us_per_event']:.1f}")
    console.print(b)
    console.print(f"results written to {RESULTS.relative_to(e2e.ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serial", type=int, default=300, help="events timed one at a time (after 50 warm-up)")
    parser.add_argument("--burst", type=int, default=10_000, help="events in the burst")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)

    def say(msg: str) -> None:
        if not args.json_only:
            print(msg, file=sys.stderr, flush=True)

    try:
        doc = run(args, say)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
        if not isinstance(exc, e2e.BenchError):
            traceback.print_exc()
        print(f"stages: {exc}", file=sys.stderr)
        return 1
    e2e.write_results(RESULTS, doc)
    return e2e.report(doc, args.json_only, _print)


if __name__ == "__main__":
    sys.exit(main())
