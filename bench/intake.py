"""Intake benchmark: how fast the daemon journals and acknowledges events, against paho alone.

The journal, not the broker, is the buffer (a stock mosquitto queues 1,000 messages for a client and
drops the rest), so taking events in must cost far less than running them. One private mosquitto
(its config only a listener, `LocalBroker()`), and two subscribers of their own topics, both on the
same CPU:

  edgefn    `edgefn run` with bench/functions/nothing (a function that answers every event with no
            message), subscribed at QoS 1 as always (MQTT 5, manual acks, a persistent session,
            Receive Maximum 65535).
  paho      the baseline: a plain paho-mqtt 2 client with the same CONNECT (MQTT 5, manual acks,
            persistent, Receive Maximum 65535) whose on_message only acknowledges the message.

Each round publishes a burst of --events events (default 30,000; about 200-byte JSON payloads) at
QoS 1 from two publisher processes, each writing its half down one connection at once (raw MQTT
3.1.1 packets, so that the publishers cost the broker's CPU next to nothing), first to the paho
client's topic, then to the daemon's. Measured:

  edgefn  the inbox's last event id (sqlite_sequence, read from this process every 5 ms): the rate is
          the events journaled from the first poll that saw one to the poll that saw the last one,
          over that time. Ingress acknowledges each group right after its commit, on the same thread
          (before it reads the next packet), so this is the rate of events journaled and acknowledged;
          after each round the daemon's edgefn_events_received_total (counted after the PUBACK) must
          have grown by the events journaled, and the inbox emptied.
  paho    the client's own clock at its first and last message of the burst: (n - 1) / that time.
  broker  the publishers' clock from their first write to the last PUBACK: how fast the broker took
          the burst in (an upper bound on what either subscriber can be seen to take).

A burst ends when every event came, or none more for 2 s: a stock mosquitto (2.0.11 here) drops QoS 1
messages for a subscriber that reads slower than the burst comes, even with a Receive Maximum of 65535
(thousands of a burst: its $SYS/broker/publish/messages/dropped counts them). What each subscriber
never got is reported as lost at the broker: the journal can be the buffer only for what intake reads
in time.

Also each subscriber's CPU time per event (user + system, /proc): less at the mercy of other programs'
load than the rates are, not free of it (paho alone measured 45-85 us an event on a shared machine).
With two CPUs or more (--pin, the default there), the daemon and the paho client run on one CPU
(taskset) and the broker, the publishers and this process on another, so that the subscriber's rate
is its own. Rounds alternate paho and edgefn; medians are reported.

    .venv/bin/python bench/intake.py [--events 30000] [--rounds 3] [--payload-bytes 200] [--no-pin]
                                     [--profile FILE] [--json-only]

--profile FILE: py-spy records the daemon (the thread holding the GIL) during its bursts, as
collapsed stacks in FILE (its sampling slows the daemon: the rates of such a run are not the figures).

Target: edgefn >= 10,000 events/s. Results also go to bench/results/intake.json. Exit status 0
whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (child processes, the results file, the report)

RESULTS = e2e.ROOT / "bench" / "results" / "intake.json"
FUNCTION = e2e.ROOT / "bench" / "functions" / "nothing"
DAEMON_TOPIC = "sensors/bench/nothing"
PAHO_TOPIC = "sensors/bench/paho"
RECEIVE_MAXIMUM = 65535
SESSION_EXPIRY_S = 3600
POLL_S = 0.005
ROUND_CAP_S = 120.0
IDLE_S = 2.0  # a burst is over when nothing more came for this long (the broker may have dropped the rest)
TARGET_EPS = 10_000


# -- the publishers: raw MQTT 3.1.1, every packet written at once ----------------------------------
def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _remaining_length(len(body)) + body


def _string(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def payload(tag: str, i: int, size: int) -> bytes:
    head = json.dumps({"id": f"{tag}-{i}", "pad": ""}).encode()
    return json.dumps({"id": f"{tag}-{i}", "pad": "x" * max(0, size - len(head))}).encode()


def publisher(port: int, topic: str, count: int, tag: str, size: int) -> None:
    """Publish `count` events at QoS 1 and wait for every PUBACK; print (first write, last PUBACK) as JSON."""
    if count > 65535:
        raise SystemExit("a publisher sends at most 65535 events (one packet id each)")
    packets = b"".join(_packet(0x32, _string(topic) + mid.to_bytes(2, "big") + payload(tag, mid, size))
                       for mid in range(1, count + 1))
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_packet(0x10, _string("MQTT") + bytes([4, 0x02, 0, 60]) + _string(f"bench-pub-{tag}")))
    if sock.recv(4)[:1] != b"\x20":
        raise SystemExit("the broker did not answer CONNECT")
    done = threading.Event()
    acked_at = [0.0]

    def read_acks() -> None:
        seen, buf = 0, b""
        while seen < count:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
            whole = len(buf) // 4 * 4  # PUBACKs only: 0x40 0x02 and the packet id
            seen += whole // 4
            buf = buf[whole:]
        acked_at[0] = time.monotonic()
        done.set()

    reader = threading.Thread(target=read_acks, daemon=True)
    reader.start()
    started = time.monotonic()
    sock.sendall(packets)
    if not done.wait(ROUND_CAP_S):
        raise SystemExit("the broker did not acknowledge every event")
    sock.sendall(b"\xe0\x00")
    sock.close()
    print(json.dumps({"started": started, "acked": acked_at[0]}), flush=True)


def _publish(port: int, topic: str, events: int, tag: str, size: int) -> dict[str, float]:
    """Two publishers, half the events each; the broker's intake time (first write -> last PUBACK)."""
    halves = [events // 2, events - events // 2]
    procs = [subprocess.Popen([sys.executable, __file__, "--publisher", str(port), topic, str(n), f"{tag}-{k}",
                               str(size)], stdout=subprocess.PIPE, text=True)
             for k, n in enumerate(halves)]
    times = []
    for proc in procs:
        out, _ = proc.communicate(timeout=ROUND_CAP_S + 10)
        if proc.returncode != 0:
            raise e2e.BenchError(f"a publisher failed (status {proc.returncode})")
        times.append(json.loads(out))
    took = max(t["acked"] for t in times) - min(t["started"] for t in times)
    return {"broker_took_s": round(took, 3), "broker_eps": round(events / took)}


# -- the baseline: paho alone, acknowledging ---------------------------------------------------------
def ack_only(port: int, topic: str, events: int) -> None:
    """A plain paho MQTT 5 client that only acknowledges; per burst of `events`, prints its first and
    last message's time and its CPU seconds as JSON; "ready" once subscribed."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-intake-paho-{os.getpid()}",
                         protocol=mqtt.MQTTv5, manual_ack=True)
    client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    state = {"n": 0, "first": 0.0, "last": 0.0}
    lock = threading.Lock()

    def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        c.ack(msg.mid, msg.qos)
        now = time.monotonic()
        with lock:
            state["n"] += 1
            if state["n"] == 1:
                state["first"] = now
            state["last"] = now

    def report_bursts() -> None:  # a burst is over once nothing came for IDLE_S
        while True:
            time.sleep(0.1)
            with lock:
                if state["n"] and time.monotonic() - state["last"] > IDLE_S:
                    print(json.dumps({**state, "cpu_s": time.process_time()}), flush=True)
                    state["n"] = 0

    threading.Thread(target=report_bursts, daemon=True).start()
    client.on_message = on_message
    client.on_subscribe = lambda *_a: print("ready", flush=True)
    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_forever()


class Paho:
    """The baseline as a child process; `burst()` reads its line for one burst."""

    def __init__(self, port: int, events: int, cpu: int | None):
        pinned = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.proc = subprocess.Popen([*pinned, sys.executable, __file__, "--ack-only", str(port), PAHO_TOPIC,
                                      str(events)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise e2e.BenchError("the paho baseline did not subscribe")
        self.cpu_s = 0.0

    def burst(self, events: int) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise e2e.BenchError("the paho baseline exited")
        got = json.loads(line)
        cpu, self.cpu_s = got["cpu_s"] - self.cpu_s, got["cpu_s"]
        took = got["last"] - got["first"]
        return {"eps": round((got["n"] - 1) / took), "took_s": round(took, 3), "taken": got["n"],
                "lost_at_broker": events - got["n"], "cpu_us_per_event": round(cpu / got["n"] * 1e6, 1)}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- the daemon --------------------------------------------------------------------------------------
class Daemon:
    """`edgefn run` with the do-nothing function; its inbox watched from here."""

    def __init__(self, broker_url: str, workdir: Path, cpu: int | None):
        self.state = workdir / "edgefn"
        self.metrics_port = _free_port()
        pinned = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.system = e2e.System("edgefn", [*pinned, sys.executable, "-m", "edgefn.cli", "run", "--broker", broker_url,
                                            "--functions", str(FUNCTION), "--state-dir", str(self.state),
                                            "--client-id", "bench-intake", "--no-build", "--log-level", "warning",
                                            "--metrics-port", str(self.metrics_port)], workdir)
        self.system.start()
        self._db: sqlite3.Connection | None = None

    @property
    def pid(self) -> int:
        assert self.system.proc is not None
        return self.system.proc.pid

    def _sql(self, query: str) -> int:
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.state / 'inbox.sqlite'}?mode=ro", uri=True, timeout=5,
                                       check_same_thread=False)  # the watcher polls it, then this thread
        row = self._db.execute(query).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def last_id(self) -> int:
        return self._sql("SELECT seq FROM sqlite_sequence WHERE name = 'inbox'")

    def inbox_rows(self) -> int:
        return self._sql("SELECT COUNT(*) FROM inbox")

    def received(self) -> int:
        """edgefn_events_received_total: events journaled, acknowledged and handed on."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("edgefn_events_received_total "):
                    return int(float(line.split()[1]))
        return 0

    def wait_ready(self, port: int) -> None:
        """Until the daemon journals a probe event (it has subscribed), and its inbox is empty again."""
        deadline = time.monotonic() + e2e.READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.system.check()
            if (self.state / "inbox.sqlite").exists():
                _publish(port, DAEMON_TOPIC, 2, "probe", 50)
                if self.last_id() > 0:
                    self.drain(e2e.READY_TIMEOUT_S)
                    return
            time.sleep(0.25)
        raise e2e.BenchError(f"the daemon journaled no event within {e2e.READY_TIMEOUT_S:g} s:\n{self.system.log_tail()}")

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.inbox_rows() and time.monotonic() < deadline:
            time.sleep(0.05)

    def burst(self, port: int, events: int, size: int, tag: str) -> tuple[dict[str, Any], dict[str, float]]:
        base, received, cpu = self.last_id(), self.received(), e2e._cpu_seconds(self.pid)
        seen: list[tuple[float, int]] = []
        stop = threading.Event()

        def watch() -> None:  # until all came, or none more for IDLE_S after the publishers were done
            while not stop.is_set() or (seen and time.monotonic() - seen[-1][0] < IDLE_S):
                n = self.last_id() - base
                if n > 0 and (not seen or n > seen[-1][1]):
                    seen.append((time.monotonic(), n))
                if n >= events:
                    return
                time.sleep(POLL_S)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            broker = _publish(port, DAEMON_TOPIC, events, tag, size)
        finally:
            stop.set()
            watcher.join(ROUND_CAP_S)
        if not seen:
            raise e2e.BenchError(f"the daemon journaled none of {events} events:\n{self.system.log_tail()}")
        cpu_after = e2e._cpu_seconds(self.pid)
        self.drain(ROUND_CAP_S)
        acked = self.received() - received
        (t0, n0), (t1, n1) = seen[0], seen[-1]
        return ({"eps": round((n1 - n0) / (t1 - t0)), "took_s": round(t1 - t0, 3), "taken": n1,
                 "lost_at_broker": events - n1, "acknowledged": acked,
                 "answered": self.inbox_rows() == 0,
                 "cpu_us_per_event": round((cpu_after - cpu) / n1 * 1e6, 1) if cpu is not None and cpu_after
                 is not None else None}, broker)

    def stop(self) -> None:
        if self._db is not None:
            self._db.close()
        self.system.stop()


class Profile:
    """py-spy recording a process (collapsed stacks) until `stop`, which appends them to `out`."""

    def __init__(self, pid: int, out: Path):
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out, self.part = out, out.with_name(f"{out.name}.part")
        self.proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--gil",
                                      "--output", str(self.part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has
        self.proc.wait(30)
        if self.part.exists():
            with self.out.open("a") as f:
                f.write(self.part.read_text())
            self.part.unlink()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpus(pin: bool) -> tuple[int | None, int | None]:
    """(the subscribers' CPU, the broker's and publishers') with --pin; (None, None) without."""
    mine = sorted(os.sched_getaffinity(0))
    if not pin:
        return None, None
    if len(mine) < 2 or shutil.which("taskset") is None:
        raise e2e.BenchError(f"cannot pin the subscribers apart: CPUs {mine}, taskset "
                             f"{'found' if shutil.which('taskset') else 'missing'} (--no-pin runs them together)")
    return mine[0], mine[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgefn.mqtt.local_broker import LocalBroker

    def say(msg: str) -> None:
        if not args.json_only:
            print(msg, file=sys.stderr, flush=True)

    e2e.ensure_built(FUNCTION)
    subscribers, others = _cpus(args.pin)
    if others is not None:
        os.sched_setaffinity(0, {others})  # this process, and the publishers it starts
    rounds: list[dict[str, Any]] = []
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edgefn-intake-") as tmp:
        if others is not None:
            os.sched_setaffinity(broker.pid, {others})
        say(f"broker {broker.url}; subscribers on CPU {subscribers}, broker and publishers on CPU {others}")
        paho, daemon = Paho(broker.port, args.events, subscribers), Daemon(broker.url, Path(tmp), subscribers)
        try:
            daemon.wait_ready(broker.port)
            for r in range(args.rounds):
                profiler = Profile(daemon.pid, args.profile) if args.profile else None
                paho_broker = _publish(broker.port, PAHO_TOPIC, args.events, f"paho{r}", args.payload_bytes)
                baseline = paho.burst(args.events)
                try:
                    edgefn, edge_broker = daemon.burst(broker.port, args.events, args.payload_bytes, f"edgefn{r}")
                finally:
                    if profiler is not None:
                        profiler.stop()
                rounds.append({"paho": {**baseline, **paho_broker}, "edgefn": {**edgefn, **edge_broker}})
                say(f"round {r + 1}: paho {baseline['eps']:,} events/s ({baseline['cpu_us_per_event']} µs CPU an event, "
                    f"{baseline['lost_at_broker']} lost), edgefn {edgefn['eps']:,} events/s "
                    f"({edgefn['cpu_us_per_event']} µs, {edgefn['lost_at_broker']} lost); the broker took them at "
                    f"{paho_broker['broker_eps']:,} and {edge_broker['broker_eps']:,}/s")
        finally:
            paho.stop()
            daemon.stop()
    median = {who: {key: round(statistics.median(r[who][key] for r in rounds), 1)
                    for key in ("eps", "cpu_us_per_event", "broker_eps", "lost_at_broker")} for who in ("paho", "edgefn")}
    doc = {
        "benchmark": "bench/intake.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"events": args.events, "rounds": args.rounds, "payload_bytes": args.payload_bytes,
                   "pinned": {"subscribers": subscribers, "broker_and_publishers": others}},
        "env": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rounds": rounds,
        "median": median,
        "summary": {"edgefn_eps": median["edgefn"]["eps"], "paho_eps": median["paho"]["eps"],
                    "ratio": round(median["edgefn"]["eps"] / median["paho"]["eps"], 3),
                    "all_acknowledged": all(r["edgefn"]["acknowledged"] == r["edgefn"]["taken"] for r in rounds),
                    "lost_at_broker": {"edgefn": median["edgefn"]["lost_at_broker"],
                                       "paho": median["paho"]["lost_at_broker"]},
                    "target_eps": TARGET_EPS},
    }
    e2e.write_results(RESULTS, doc)
    return doc


def _print_table(doc: dict[str, Any]) -> None:
    s, m = doc["summary"], doc["median"]
    print(f"intake, medians of {doc['config']['rounds']} bursts of {doc['config']['events']:,} events "
          f"(pinned: {doc['config']['pinned']})")
    print(f"  edgefn (journaled and acknowledged): {s['edgefn_eps']:>8,.0f} events/s  "
          f"{m['edgefn']['cpu_us_per_event']:>6} µs CPU an event  (target {s['target_eps']:,})")
    print(f"  paho alone (acknowledged):           {s['paho_eps']:>8,.0f} events/s  {m['paho']['cpu_us_per_event']:>6} "
          f"µs CPU an event")
    print(f"  ratio edgefn/paho: {s['ratio']:.2f}; broker took the bursts at {m['edgefn']['broker_eps']:,.0f} (edgefn's) "
          f"and {m['paho']['broker_eps']:,.0f} (paho's) events/s; every event journaled acknowledged: "
          f"{s['all_acknowledged']}")
    print(f"  lost at the broker (mosquitto dropped them; median): edgefn {m['edgefn']['lost_at_broker']:,.0f}, "
          f"paho {m['paho']['lost_at_broker']:,.0f}")
    print(f"results written to {RESULTS.relative_to(e2e.ROOT)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--publisher"]:  # a child: port topic count tag size
        port, topic, count, tag, size = argv[1:6]
        publisher(int(port), topic, int(count), tag, int(size))
        return 0
    if argv[:1] == ["--ack-only"]:  # a child: port topic events
        ack_only(int(argv[1]), argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=30_000, help="events in each burst (at most 131070)")
    parser.add_argument("--rounds", type=int, default=3, help="bursts for each subscriber")
    parser.add_argument("--payload-bytes", type=int, default=200, help="each event's payload, about")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) >= 2,
                        help="the subscribers on one CPU, the broker and the publishers on another")
    parser.add_argument("--profile", type=Path, metavar="FILE", help="py-spy's collapsed stacks of the daemon")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    if not 2 <= args.events <= 131_070 or args.rounds < 1:
        parser.error("--events must be from 2 to 131070, --rounds at least 1")
    return e2e.run_main("intake", run, args, _print_table)


if __name__ == "__main__":
    sys.exit(main())
