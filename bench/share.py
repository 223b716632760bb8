"""Shared subscriptions: what the broker does with a group member that is SIGKILLed mid-stream.

Two `edgefn run` daemons, the digits function triggered by `$share/bench/sensors/+/digits` (each
with a version of its own, 1.0.0-a and 1.0.0-b, so a result says who answered), one private
mosquitto. --events QoS1 events (default 3,000) are published at --rate a second (500); once
daemon a has answered --kill-after of them (300) it is SIGKILLed. The figures, --wait s (15) after
the last event: who answered how many, how many are unanswered (sent before the kill: a's
in-flight or journaled ones; after it: those the broker kept handing to a's session). Then a is
started again on its state dir, and after --wait s more: what it answered, what is still lost, what
was answered twice (and marked `edgefn-duplicate: possible`).

Run once with mosquitto's default queue per client (`max_queued_messages` 1000) and once with
100,000 (--queues 1000,100000).

    .venv/bin/python bench/share.py [--events N] [--rate R] [--kill-after N] [--queues 1000,100000] [--json-only]

Results also go to bench/results/share.json. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the e2e benchmark's child-process handling)

from edgefn.mqtt.local_broker import LocalBroker, mosquitto_binary  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "share.json"
TRIGGER = "$share/bench/sensors/+/digits"


class Results:
    """The results subscriber (MQTT 5, a large Receive Maximum): each result's event id, version, marks."""

    def __init__(self, port: int):
        self.lock = threading.Lock()
        self.got: list[tuple[str, str, bool]] = []  # event id, the answering daemon's version, marked a duplicate
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-share-results", protocol=mqtt.MQTTv5)
        self.client.on_message = self._message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe("results/+/digits", qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 65535
        self.client.connect("127.0.0.1", port, properties=props)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise e2e.BenchError("the results subscriber did not subscribe")

    def _message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        props = dict(getattr(msg.properties, "UserProperty", None) or [])
        with self.lock:
            self.got.append((doc["event_id"], doc["version"], props.get("edgefn-duplicate") == "possible"))

    def since(self, start: int) -> list[tuple[str, str, bool]]:
        with self.lock:
            return self.got[start:]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _function(workdir: Path, who: str) -> Path:
    folder = workdir / f"fn-{who}" / "digits"
    shutil.copytree(e2e.FUNCTION, folder)  # built: a manifest's trigger and version are not built into it
    manifest = folder / "edgefn.toml"
    manifest.write_text(manifest.read_text().replace('topics = ["sensors/+/digits"]', f'topics = ["{TRIGGER}"]')
                        .replace('version = "1.0.0"', f'version = "1.0.0-{who}"'))
    return folder


def one_run(queue: int, args: argparse.Namespace, images: list[list[int]], say: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgefn-bench-share-") as tmp, \
            LocalBroker(extra_config=f"max_queued_messages {queue}\n") as broker:
        workdir = Path(tmp)
        (workdir / "components").mkdir()
        systems = {}
        for who in ("a", "b"):
            systems[who] = e2e.edgefn_run(f"share-{who}", broker.url, workdir, [_function(workdir, who)])
            (workdir / f"share-{who}").mkdir()
            (workdir / f"share-{who}" / "components").symlink_to(workdir / "components", target_is_directory=True)
        results = Results(broker.port)
        sensor = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-share-sensor")
        sensor.connect("127.0.0.1", broker.port)
        sensor.loop_start()
        try:
            systems["a"].start()
            systems["b"].start()
            deadline, n = time.monotonic() + 3 * e2e.READY_TIMEOUT_S, 0  # both compile the component first
            while {v for _, v, _ in results.since(0)} != {"1.0.0-a", "1.0.0-b"}:  # both serving
                for system in systems.values():
                    system.check()
                if time.monotonic() > deadline:
                    raise e2e.BenchError("the two daemons did not both answer probes:\n"
                                         + "\n".join(s.log_tail() for s in systems.values()))
                sensor.publish("sensors/probe/digits", e2e._payload(f"probe-{n}", images[n % len(images)]), qos=1)
                n += 1
                time.sleep(0.1)
            time.sleep(1.0)
            start = len(results.since(0))
            ids = [f"s-{i}" for i in range(args.events)]
            sent_at_kill, t0 = None, time.monotonic()
            for i, event_id in enumerate(ids):
                sensor.publish("sensors/dev1/digits", e2e._payload(event_id, images[i % len(images)]), qos=1)
                if sent_at_kill is None and sum(v == "1.0.0-a" for _, v, _ in results.since(start)) >= args.kill_after:
                    systems["a"].proc.send_signal(signal.SIGKILL)
                    systems["a"].proc.wait()
                    systems["a"].proc, sent_at_kill = None, i + 1
                time.sleep(max(0.0, t0 + (i + 1) / args.rate - time.monotonic()))
            time.sleep(args.wait)
            down = results.since(start)
            answered = {e for e, _, _ in down}
            missing = [i for i, e in enumerate(ids) if e not in answered]
            cut = sent_at_kill or args.events
            while_down = {
                "answered_by": dict(Counter(v for _, v, _ in down)),
                "unanswered": len(missing),
                "unanswered_sent_before_the_kill": sum(i < cut for i in missing),
                "unanswered_sent_after_the_kill": sum(i >= cut for i in missing),
            }
            say(f"queue {queue}: a killed after {cut} of {args.events} sent; while it is down {while_down}")
            systems["a"].start()
            time.sleep(args.wait)
            back = results.since(start + len(down))
            every = Counter(e for e, _, _ in results.since(start))
            after = {
                "answered_by": dict(Counter(v for _, v, _ in back)),
                "unanswered": sum(e not in every for e in ids),
                "answered_twice": sum(every[e] > 1 for e in ids),
                "marked_possible_duplicate": sum(m for _, _, m in back),
            }
            say(f"queue {queue}: after a came back {after}")
            return {"max_queued_messages": queue, "events": args.events, "rate_eps": args.rate,
                    "killed_after_sent": cut, "while_down": while_down, "after_return": after}
        finally:
            for system in systems.values():
                system.stop()
            sensor.disconnect()
            sensor.loop_stop()
            results.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=500.0, help="events a second")
    parser.add_argument("--kill-after", type=int, default=300, help="daemon a's answers before it is killed")
    parser.add_argument("--wait", type=float, default=15.0, help="seconds after the stream, and after a returns")
    parser.add_argument("--queues", type=lambda t: [int(q) for q in t.split(",")], default=[1000, 100_000])
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    say = (lambda _m: None) if args.json_only else (lambda m: print(m, flush=True))
    e2e.ensure_built(e2e.FUNCTION)
    images = [row.astype(int).tolist() for row in load_digits().data[1400:1700]]
    version = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout.splitlines()
    doc = {"mosquitto": version[0] if version else "?", "trigger": TRIGGER,
           "runs": [one_run(queue, args, images, say) for queue in args.queues]}
    e2e.write_results(RESULTS, doc)
    if args.json_only:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
