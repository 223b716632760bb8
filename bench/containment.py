"""Containment benchmark: does a hostile function beside it cost a well-behaved one its latency?

One private mosquitto, one `edgefn run` with two functions: the digits example and the hostile
test guest (tests/guests/hostile, built here into a temporary folder). The digits function's
latency, one event at a time (--serial events, as in bench/e2e.py), is measured twice in the
same run: alone, then while a sensor sends the hostile function a misdeed every 50 ms, cycling
through an endless loop (stopped at its 300 ms deadline), unbounded allocation (stopped at its
48 MiB limit), an uncaught exception, a stack overflow and a flood of outputs. It prints the
neighbour's p50/p99 in both phases, their ratio, and how the hostile events ended.

    .venv/bin/python bench/containment.py [--serial N] [--json-only]

On a 2-core machine an endless loop keeps one core busy until its deadline: the ratio shows
what is left for the neighbour, not a leak through the sandbox. Results also go to
bench/results/containment.json. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the e2e benchmark's clients and child-process handling)
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edgefn.functions.build import build  # noqa: E402
from edgefn.mqtt.local_broker import LocalBroker  # noqa: E402

HOSTILE = e2e.ROOT / "tests" / "guests" / "hostile"
MISDEEDS = [b"loop", b"alloc", b"trap", b"stack", b"flood"]
RESULTS = e2e.ROOT / "bench" / "results" / "containment.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serial", type=int, default=300, help="digits events timed in each phase")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    images, labels = e2e._digits()
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edgefn-containment-") as tmp:
        workdir = Path(tmp)
        hostile = workdir / "hostile"
        shutil.copytree(HOSTILE, hostile, ignore=shutil.ignore_patterns("build", "__pycache__"))
        build(hostile)
        system = e2e.edgefn_run("containment", broker.url, workdir, [e2e.FUNCTION, hostile])
        clients = e2e.Clients(broker.port)
        endings: Counter[str] = Counter()
        watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-containment-errors")
        watcher.on_message = lambda _c, _u, m: endings.update([json.loads(m.payload)["reason"]])
        watcher.connect("127.0.0.1", broker.port)
        watcher.subscribe("edgefn/errors/hostile", qos=1)
        watcher.loop_start()
        stop = threading.Event()
        sent = Counter()

        def attack() -> None:
            n = 0
            while not stop.wait(0.05):
                misdeed = MISDEEDS[n % len(MISDEEDS)]
                # Padded to new bytes each time: the same misdeed thrice would be quarantined, not run.
                clients.pub.publish("sensors/attacker/hostile", misdeed + b" " * n, qos=1)
                sent[misdeed.decode()] += 1
                n += 1

        try:
            system.start()
            topic = "sensors/neighbour/digits"
            e2e._wait_ready(clients, system, topic, images)
            e2e._serial(clients, system, topic, images, labels, 50, "warmup")
            alone = e2e._serial(clients, system, topic, images, labels, args.serial, "alone")
            attacker = threading.Thread(target=attack)
            attacker.start()
            time.sleep(0.5)
            beside = e2e._serial(clients, system, topic, images, labels, args.serial, "beside")
            stop.set()
            attacker.join()
            time.sleep(2)  # the last misdeeds end
        finally:
            stop.set()
            system.stop()
            clients.close()
            watcher.loop_stop()
            watcher.disconnect()
    doc: dict[str, Any] = {
        "benchmark": "bench/containment.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "alone": alone, "beside_hostile": beside,
        "p50_ratio": beside["p50_ms"] / alone["p50_ms"], "p99_ratio": beside["p99_ms"] / alone["p99_ms"],
        "hostile_sent": dict(sent), "hostile_endings": dict(endings),
    }
    e2e.write_results(RESULTS, doc)
    if args.json_only:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"digits alone:          p50 {alone['p50_ms']:.3f} ms, p99 {alone['p99_ms']:.3f} ms, lost {alone['lost']}")
    print(f"digits beside hostile: p50 {beside['p50_ms']:.3f} ms, p99 {beside['p99_ms']:.3f} ms, lost {beside['lost']}")
    print(f"ratio (beside/alone):  p50 {doc['p50_ratio']:.2f}x, p99 {doc['p99_ratio']:.2f}x")
    print(f"hostile events sent {sum(sent.values())}: ended as {dict(endings)}")
    print(f"results written to {RESULTS.relative_to(e2e.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
