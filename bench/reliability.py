"""Reliability benchmark: what the journal costs, and what a crash loop loses.

One private mosquitto (its per-client queue raised to 100,000: while the daemon is down the
broker must hold what arrives, and mosquitto's default of 1000 would drop it), the digits
function and model, `edgefn run` as a child process:

  journal cost   a burst of --burst QoS1 events (default 5,000) against `edgefn run --journal disk`
                 (events committed before their PUBACK: the default) and against `--journal memory`
                 (nothing survives a crash), one after the other; throughput of each and the ratio.
                 Target: the journal costs at most 20 %.
  SIGKILL loop   --stream events (default 10,000) published at about 2,000/s while the daemon is
                 SIGKILLed --kills times (default 10) at random moments, each time once it is
                 serving again, then restarted on the same state dir; events sent, answered,
                 lost, duplicated. Target: zero lost.

  broker restart the same stream against a persistent mosquitto stopped for 1 s and started again
                 --restarts times (default 3); sensor and subscriber keep persistent sessions.
                 Events sent, answered, lost, duplicated. Target: zero lost.

Duplicates are counted with how many of them were marked as such (the MQTT 5 user property
`edgefn-duplicate: possible`, or the broker's own DUP flag when it sent a result again).

    .venv/bin/python bench/reliability.py [--burst N] [--stream N] [--kills N] [--restarts N] [--json-only]

Results also go to bench/results/reliability.json. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the e2e benchmark's clients and child-process handling)

from edgefn.mqtt.local_broker import LocalBroker  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "reliability.json"


def _edgefn(name: str, broker: LocalBroker, workdir: Path, journal: str) -> e2e.System:
    return e2e.edgefn_run(name, broker.url, workdir, [e2e.FUNCTION], "--journal", journal)


def journal_cost(broker: LocalBroker, clients: e2e.Clients, workdir: Path, n: int, images, labels) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for journal in ("disk", "memory"):
        system = _edgefn(f"journal-{journal}", broker, workdir, journal)
        system.start()
        try:
            topic = f"sensors/{system.name}/digits"
            e2e._wait_ready(clients, system, topic, images)
            out[journal] = e2e._burst(clients, system, topic, images, labels, n, {})
        finally:
            system.stop()
            clients.reset()
    out["throughput_ratio_disk_over_memory"] = (out["disk"]["throughput_eps"] / out["memory"]["throughput_eps"]
                                                if out["memory"]["throughput_eps"] else float("nan"))
    return out


def stream_with_faults(system: e2e.System, clients: e2e.Clients, n: int, faults: int, fault: Callable[[], None],
                       images, labels, seed: int) -> dict[str, Any]:
    """Publish n events at about 2,000/s and call `fault` `faults` times at random moments, each
    time once the daemon is serving again; then wait for every answer."""
    rng = random.Random(seed)
    topic = f"sensors/{system.name}/digits"
    system.start()
    e2e._wait_ready(clients, system, topic, images)
    ids = [f"{system.name}-{i}" for i in range(n)]
    with clients.lock:
        for i, event_id in enumerate(ids):
            clients.expected[event_id] = labels[i % len(labels)]

    def send() -> None:
        for i, event_id in enumerate(ids):
            clients.pub.publish(topic, e2e._payload(event_id, images[i % len(images)]), qos=1)
            time.sleep(0.0005)

    sender = threading.Thread(target=send)
    t0 = time.perf_counter()
    sender.start()
    answered_at_each_fault = []
    try:
        for _ in range(faults):
            with clients.lock:
                seen = len(clients.arrived)
            while True:  # serving again: some new answers since the last fault
                time.sleep(0.02)
                with clients.lock:
                    if len(clients.arrived) > seen + 20 or len(clients.arrived) >= n:
                        break
            time.sleep(rng.uniform(0, 0.3))
            with clients.lock:
                answered_at_each_fault.append(len(clients.arrived))
            fault()
        sender.join()
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            with clients.lock:
                if len(clients.arrived) >= n:
                    break
            time.sleep(0.1)
        time.sleep(1.0)  # late duplicates
    finally:
        system.stop()
    with clients.lock:
        answered, duplicates, marked = len(clients.arrived), clients.duplicates, clients.marked_duplicates
    clients.reset()
    return {"events": n, "faults": faults, "answered_at_each_fault": answered_at_each_fault, "answered": answered,
            "lost": n - answered, "duplicates": duplicates, "duplicates_marked": marked,
            "seconds": time.perf_counter() - t0}


def kill_loop(broker: LocalBroker, clients: e2e.Clients, workdir: Path, n: int, kills: int, images,
              labels) -> dict[str, Any]:
    system = _edgefn("killed", broker, workdir, "disk")

    def kill() -> None:
        if system.proc is not None:
            system.proc.send_signal(signal.SIGKILL)
            system.proc.wait()
        system.start()

    return stream_with_faults(system, clients, n, kills, kill, images, labels, seed=11)


def broker_restarts(workdir: Path, n: int, restarts: int, images, labels) -> dict[str, Any]:
    """The same stream while a persistent mosquitto is stopped for a second and started again;
    the sensor and the subscriber keep persistent sessions, as a deployment's would."""
    with LocalBroker(extra_config="max_queued_messages 100000\n", persistent=True) as broker:
        clients = e2e.Clients(broker.port, persistent=True)
        try:
            system = _edgefn("broker-restart", broker, workdir, "disk")
            return stream_with_faults(system, clients, n, restarts, lambda: broker.restart(down_for=1.0),
                                      images, labels, seed=12)
        finally:
            clients.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=5000, help="events in each journal-cost burst")
    parser.add_argument("--stream", type=int, default=10_000, help="events in the SIGKILL loop")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs during the stream")
    parser.add_argument("--restarts", type=int, default=3, help="broker restarts during the stream")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    images, labels = e2e._digits()
    with LocalBroker(extra_config="max_queued_messages 100000\n") as broker, \
            tempfile.TemporaryDirectory(prefix="edgefn-reliability-") as tmp:
        clients = e2e.Clients(broker.port)
        try:
            doc = {"benchmark": "bench/reliability.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "journal_cost": journal_cost(broker, clients, Path(tmp), args.burst, images, labels),
                   "sigkill_loop": kill_loop(broker, clients, Path(tmp), args.stream, args.kills, images, labels)}
        finally:
            clients.close()
        doc["broker_restart"] = broker_restarts(Path(tmp), args.stream, args.restarts, images, labels)
    e2e.write_results(RESULTS, doc)
    if args.json_only:
        print(json.dumps(doc, indent=2))
        return 0
    jc = doc["journal_cost"]
    cost = 1 - jc["throughput_ratio_disk_over_memory"]
    print(f"journal cost: disk {jc['disk']['throughput_eps']:,.0f} events/s (lost {jc['disk']['lost']}) vs "
          f"memory {jc['memory']['throughput_eps']:,.0f} events/s (lost {jc['memory']['lost']}): "
          f"{cost:+.1%} throughput  [target <= 20 %: {'met' if cost <= 0.20 else 'missed'}]")
    for title, key in (("SIGKILL", "sigkill_loop"), ("broker restart", "broker_restart")):
        r = doc[key]
        print(f"{title} x{r['faults']} during {r['events']:,} events: answered {r['answered']:,}, lost {r['lost']}, "
              f"duplicates {r['duplicates']} ({r['duplicates_marked']} marked)  "
              f"[target 0 lost: {'met' if r['lost'] == 0 else 'missed'}]")
    print(f"results written to {RESULTS.relative_to(e2e.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
