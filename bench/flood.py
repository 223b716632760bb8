"""Flood benchmark: one function flooded at its top rate while its neighbour is probed at 20 events/s.

One private mosquitto with only a listener (`listener PORT 127.0.0.1`, `allow_anonymous true`: its
queue per client is the stock 1,000 messages), or with `max_queued_messages 100000` (--tuned), and
one `edgefn run` child process with two functions: digits (the neighbour, triggered by
sensors/+/digits) and digits-flood (the same component and model under another name, triggered by
sensors/+/digits-flood). Steps:

  1. the neighbour alone: probed at 20 events/s for min(20 s, the flood's length); latency = publish to
     its result at a subscriber in this process (p50, p99).
  2. the flood: three sensor clients publish digits-flood as fast as the broker takes them (each keeps
     up to 1,000 unacknowledged) for --minutes, while the neighbour is probed as in 1. Neighbour
     p50/p99 under the flood and its ratio to alone [target: p99 <= 2x], probes never answered [0].
  3. after the flood, the daemon gets up to 120 s to answer what it journaled. Flood events sent and
     acknowledged by the broker, journaled by the daemon (its edgefn_events_received_total less the
     probes it answered), answered with a result, answered with reason shed, other errors, still unanswered; the
     broker's log lines 'Outgoing messages are being dropped for client ...' [0] for the daemon's
     sessions, and the flood events acknowledged by the broker but never delivered; the largest inbox
     (events journaled, unanswered), held count (past the inbox's bound, unacknowledged) and outbox
     (answers awaiting the broker's PUBACK) /healthz said during the flood.

This process publishes the flood and subscribes to the probes' results, so it shares the cores with
the daemon and the broker: the figures are pessimistic on a small machine, and noisy where other
work runs beside them.

    .venv/bin/python bench/flood.py [--minutes 1] [--tuned] [--flood-weight W] [--flood-priority low]
                                     [--json-only]

Results also go to bench/results/flood-stock.json (flood-tuned.json with --tuned). Exit status 0
whatever the figures; 1 when the run failed (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (clients, child processes, payloads, digits images)
import soak  # noqa: E402  (the broker, the daemon with digits and digits-flood, sensors, latency)

from edgefn.functions.sandbox import Runtime  # noqa: E402

FLOOD_TOPIC, PROBE_TOPIC = "sensors/flood/digits-flood", soak.PROBE_TOPIC
BROKERS = {"stock": "", "tuned": "max_queued_messages 100000\n"}
TARGETS = {"p99_ratio_max": 2.0, "lost_max": 0, "broker_dropped_max": 0}
DRAIN_S = 120.0
ALONE_S = 20.0
_DROPPED = re.compile(r"Outgoing messages are being dropped for client (\S+?)\.?$", re.M)


def _handled(daemon: soak.Daemon) -> dict[str, dict[str, int]]:
    """The daemon's count of events answered, by function and outcome (ok, shed, ...)."""
    text = daemon._get("/metrics", 5).decode()
    found: dict[str, dict[str, int]] = {}
    for fn, outcome, n in re.findall(r'^edgefn_events_handled_total\{function="([^"]+)",outcome="([^"]+)"\} (\S+)$',
                                     text, re.M):
        found.setdefault(fn, {})[outcome] = int(float(n))
    return found


def _drain(daemon: soak.Daemon, until: float) -> bool:
    """Wait until the daemon has nothing journaled left to answer, or `until`; whether it got there."""
    while time.perf_counter() < until:
        daemon.system.check()
        health = daemon.health()
        if health is not None and health["inbox_events"] == 0 and health["outbox_messages"] == 0:
            return True
        time.sleep(0.5)
    return False


def _watch(daemon: soak.Daemon, stop: threading.Event, peaks: dict[str, int]) -> None:
    """The largest inbox (journaled, unanswered), held (unacknowledged) and outbox (answers not yet acknowledged by
    the broker) counts /healthz says, every 0.5 s."""
    while not stop.wait(0.5):
        health = daemon.health()
        if health is not None:
            for key in ("inbox_events", "held_unacknowledged", "outbox_messages"):
                peaks[key] = max(peaks.get(key, 0), int(health.get(key) or 0))


def measure(ctx: soak.Context, broker: soak.Broker, clients: e2e.Clients) -> dict[str, Any]:
    seconds = ctx.args.minutes * 60
    daemon = ctx.daemon(f"flood-{broker.name}", broker, flood=True)
    daemon.start(clients, ctx.images, PROBE_TOPIC)
    try:
        clients.sub.subscribe("results/+/digits-flood", qos=1)
        time.sleep(0.5)
        e2e._wait_ready(clients, daemon.system, FLOOD_TOPIC, ctx.images)
        clients.sub.unsubscribe("results/+/digits-flood")  # this process must not be what slows the probes
        time.sleep(0.5)
        clients.reset()
        alone = soak._latency(clients, soak._probe(ctx, broker, clients, "alone", min(ALONE_S, seconds)))
        clients.reset()
        before, handled_before = daemon.received(), _handled(daemon)
        offered: dict[str, Any] = {}
        flooder = threading.Thread(target=lambda: offered.update(soak._offer(
            broker.port, FLOOD_TOPIC, "flood", 1 << 40, ctx.payload, None, seconds, clients, threads=3)), daemon=True)
        peaks: dict[str, int] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(daemon, stop, peaks), daemon=True)
        flooder.start()
        watcher.start()
        probes = soak._probe(ctx, broker, clients, "during", seconds)
        flooder.join()
        stop.set()
        during = soak._latency(clients, probes, wait_s=DRAIN_S)
        drained = _drain(daemon, time.perf_counter() + DRAIN_S)
        handled = _handled(daemon)
        flood = {k: v - handled_before.get("digits-flood", {}).get(k, 0)
                 for k, v in handled.get("digits-flood", {}).items()}
        probed = sum(handled.get("digits", {}).values()) - sum(handled_before.get("digits", {}).values())
        journaled = int(daemon.received() - before) - probed  # the probes delivered were all answered (drained)
        answered = sum(flood.values())
        drops = _DROPPED.findall(broker.proc.log_tail(10_000_000))
        daemon_drops = [c for c in drops if c.startswith("bench-flood-")]
        doc = {"minutes": ctx.args.minutes, "flood_offered_eps": offered.get("offered_eps"),
               "flood_sent": offered.get("sent"), "flood_broker_acked": offered.get("broker_acked"),
               "flood_journaled": journaled, "flood_journaled_eps": journaled / seconds,
               "flood_ok": flood.get("ok", 0), "flood_shed": flood.get("shed", 0),
               "flood_other_errors": answered - flood.get("ok", 0) - flood.get("shed", 0),
               "flood_unanswered": journaled - answered, "drained": drained,
               "peak_inbox_events": peaks.get("inbox_events"), "peak_held": peaks.get("held_unacknowledged"),
               "peak_outbox": peaks.get("outbox_messages"),
               "flood_not_delivered": max(0, int(offered.get("broker_acked") or 0) - journaled),
               "broker_drop_lines_daemon": len(daemon_drops), "broker_drop_lines_other": len(drops) - len(daemon_drops),
               "alone": alone, "during": during, "p99_ratio": during["p99_ms"] / alone["p99_ms"],
               "probes_lost": during["lost"] + alone["lost"],
               "daemon_shed_log_lines": daemon.system.log_tail(10_000_000).count("shed")}
    finally:
        stopped = daemon.stop()
    return {**doc, **stopped}


def run(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    e2e.ensure_built(e2e.FUNCTION)
    images, labels = e2e._digits()
    name = "tuned" if args.tuned else "stock"
    doc: dict[str, Any] = {"benchmark": "bench/flood.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "config": {"minutes": args.minutes, "broker": name, "flood_weight": args.flood_weight,
                                      "flood_priority": args.flood_priority,
                                      "broker_conf": f"listener PORT 127.0.0.1\nallow_anonymous true\n{BROKERS[name]}"},
                           "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="edgefn-flood-") as tmp:
        ctx = soak.Context(args, Path(tmp), images, labels)
        trigger = f'priority = "{args.flood_priority}"' if args.flood_priority else ""
        ctx.flood = soak.digits_copy(ctx.workdir, "digits-flood", trigger)
        if args.flood_weight is not None:  # its part of the journal's bound, against digits' weight of 1
            manifest = ctx.flood[0] / "edgefn.toml"
            manifest.write_text(manifest.read_text().replace("[limits]\n", f"[limits]\njournal_weight = {args.flood_weight}\n"))
        with Runtime(ctx.workdir / "components") as runtime:  # compiled once, outside the measured daemon
            runtime.load(e2e.FUNCTION / "build" / "digits.wasm")
        say(f"flood for {args.minutes:g} min, {name} broker")
        with soak.Broker(name, ctx.workdir, BROKERS[name]) as broker:
            clients = e2e.Clients(broker.port)
            try:
                doc["result"] = soak.attempt(measure, ctx, broker, clients)
            finally:
                clients.close()
    e2e.write_results(e2e.ROOT / "bench" / "results" / f"flood-{name}.json", doc)
    return doc


ROWS = [("flood offered, 3 sensors at top rate (events/s)", "flood_offered_eps", "{:,.0f}"),
        ("flood sent / acknowledged by the broker", ("flood_sent", "flood_broker_acked"), "{:,}"),
        ("flood journaled by the daemon (events, events/s)", ("flood_journaled", "flood_journaled_eps"), "{:,.0f}"),
        ("flood acknowledged by the broker, never delivered", "flood_not_delivered", "{:,}"),
        ("broker 'messages are being dropped' lines, daemon [0]", "broker_drop_lines_daemon", "{:,}"),
        ("  for the bench's own clients", "broker_drop_lines_other", "{:,}"),
        ("flood answered: results / shed / other errors", ("flood_ok", "flood_shed", "flood_other_errors"), "{:,}"),
        ("flood journaled, unanswered after the drain [0]", "flood_unanswered", "{:,}"),
        ("largest inbox / held / outbox during the flood", ("peak_inbox_events", "peak_held", "peak_outbox"), "{:,}"),
        ("neighbour alone p50 / p99 (ms)", ("alone.p50_ms", "alone.p99_ms"), "{:,.1f}"),
        ("neighbour under the flood p50 / p99 (ms)", ("during.p50_ms", "during.p99_ms"), "{:,.1f}"),
        ("neighbour p99 under flood / alone [<= 2]", "p99_ratio", "{:,.2f}"),
        ("neighbour probes sent / never answered [0]", ("during.probes", "probes_lost"), "{:,}")]


def _get(doc: dict, path: str) -> Any:
    for key in path.split("."):
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _print(doc: dict[str, Any]) -> None:
    result = doc["result"]
    print(f"flood benchmark, {doc['config']['broker']} broker, {doc['config']['minutes']:g} min")
    if "error" in result:
        print(f"failed: {result['error']}")
        return
    for label, key, fmt in ROWS:
        keys = key if isinstance(key, tuple) else (key,)
        values = [_get(result, k) for k in keys]
        print(f"{label:56}" + " / ".join("-" if v is None else fmt.format(v) for v in values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="length of the flood (the issue's target: 10)")
    parser.add_argument("--tuned", action="store_true", help="the broker with max_queued_messages 100000")
    parser.add_argument("--flood-weight", type=float, help="digits-flood's journal_weight (digits has 1; default 1)")
    parser.add_argument("--flood-priority", choices=("low", "high"), help="digits-flood's priority (default normal, "
                        "as digits: both on one events session; low: the flood on a session of its own)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    try:
        doc = run(args, (lambda _m: None) if args.json_only else (lambda m: print(m, file=sys.stderr, flush=True)))
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and exits non-zero
        if not isinstance(exc, e2e.BenchError):
            traceback.print_exc()
        print(f"flood: failed: {exc}", file=sys.stderr)
        return 1
    if args.json_only:
        print(json.dumps(doc, indent=2))
    else:
        _print(doc)
    return 1 if "error" in doc["result"] else 0


if __name__ == "__main__":
    sys.exit(main())
