"""Elastic instances: cold start after scale-to-zero, the memory scaling to zero frees, and bursts
served by an elastic pool against a fixed one.

Three `edgefn run` child processes side by side (the digits example, built first if needed, its
component cached and shared), each with its own trigger topic (`sensors/<name>/digits`), on a private
mosquitto (`LocalBroker(tuned=True)`: Nagle off, so that the broker's delayed ACK does not add its
~40 ms to every answer, warm or cold alike; `--stock` for a stock broker). The three copies of the
digits function differ only in their manifest's `[limits]`:

  elastic  min_instances = 0, max_instances = 4, idle_s = --idle-s (default 0.3)
  hold     min_instances = 0, max_instances = 4, idle_s = 3 (the memory phase: time to read it scaled up)
  fixed    instances = 4 (the older key: a fixed pool of four)

  1. cold start (elastic): --cycles times (default 100): wait until the daemon's
     `edgefn_function_instances{function="digits"}` reads 0 (scaled to zero), publish one event and
     time it to its result (perf_counter, this process); then one more event at once, on the instance
     the first one made (warm, the same run's baseline). Reported: p50/p99 of each, and of the
     instantiation alone (`last_cold_start_ms` in /healthz). Targets: cold p50 <= 20 ms, p99 <= 50 ms.
  2. memory (hold): a burst scales the pool up; after its last answer, the daemon's RssAnon
     (/proc/PID/status: its own memory, not the shared mapped code) and what its instances hold by its
     own measure (/healthz: instances x instance_mb); once scaled to zero, RssAnon again. Freed =
     before - after; target: >= 80 % of what the instances held. (Scaling down also hands the heap's
     free pages back to the OS, those of other work too: freed can exceed what they held.) Apart from
     the daemon's own estimate: the fixed daemon's idle RssAnon minus the elastic one's at zero, after
     the same bursts, is what four warm instances hold.
  3. bursts (elastic from zero, fixed), --rounds times each, alternating (the machine's load drifts):
     --burst events (default 2,000) at QoS1 as fast as paho takes them; throughput = answered / (first
     publish -> last result), lost = sent - answered. Reported: the median round of each.

    .venv/bin/python bench/elastic.py [--cycles 100] [--idle-s 0.3] [--burst 2000] [--rounds 3] [--stock]
                                      [--json-only]

About 3 minutes. Results also go to bench/results/elastic.json. Exit status 0 whatever the figures; 1
when something failed to run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (child processes, building, clients, digits images)

from edgefn.functions.sandbox import Runtime  # noqa: E402
from edgefn.mqtt.local_broker import LocalBroker  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "elastic.json"
TARGETS = {"cold_p50_ms_max": 20.0, "cold_p99_ms_max": 50.0, "freed_share_min": 0.8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _topic(name: str) -> str:
    return f"sensors/{name}/digits"


def _variant(dest: Path, name: str, limits: str) -> Path:
    """The built digits example under `dest`, triggered by `_topic(name)`, its [limits] replaced."""
    folder = dest / "digits"
    shutil.copytree(e2e.FUNCTION, folder, ignore=shutil.ignore_patterns("__pycache__"))
    text = (folder / "edgefn.toml").read_text().replace('"sensors/+/digits"', f'"{_topic(name)}"')
    (folder / "edgefn.toml").write_text(re.sub(r"\[limits\][^\[]*", f"[limits]\n{limits}\n\n", text))
    return folder


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return answer.read()


def _instances(port: int) -> int:
    text = _get(port, "/metrics").decode()
    found = re.search(r'^edgefn_function_instances\{function="digits"\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else -1


def _health(port: int) -> dict[str, Any]:
    try:
        return json.loads(_get(port, "/healthz"))
    except urllib.error.HTTPError as exc:  # 503 (degraded): its document all the same
        return json.loads(exc.read())


def _rss_anon_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise e2e.BenchError(f"timed out waiting until {what}")
        time.sleep(0.01)


def _one(clients: e2e.Clients, topic: str, event_id: str, image: list[int]) -> float | None:
    """Publish one event and wait for its result: ms, or None if none came within 2 s."""
    with clients.lock:
        clients.expected[event_id] = -1
        clients.waiting_for = event_id
        clients.answer.clear()
    t0 = time.perf_counter()
    clients.pub.publish(topic, e2e._payload(event_id, image), qos=1)
    if not clients.answer.wait(e2e.SERIAL_TIMEOUT_S):
        return None
    with clients.lock:
        return (clients.arrived[event_id] - t0) * 1000.0


def _pcts(values: list[float]) -> dict[str, float]:
    a = np.array(values or [np.nan])
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(np.max(a)),
            "n": len(values)}


def _cold_starts(clients: e2e.Clients, system: e2e.System, port: int, images: list[list[int]], cycles: int,
                 idle_s: float) -> dict[str, Any]:
    cold, warm, made, lost = [], [], [], 0
    for i in range(cycles):
        system.check()
        _wait(lambda: _instances(port) == 0, idle_s * 20 + 5, "the pool scaled to zero")
        ms = _one(clients, _topic(system.name), f"cold-{i}", images[i % len(images)])
        warm_ms = _one(clients, _topic(system.name), f"warm-{i}", images[(i + 1) % len(images)])
        for value, into in ((ms, cold), (warm_ms, warm)):
            if value is None:
                lost += 1
            else:
                into.append(value)
        made.append(_health(port)["instances"]["digits"]["last_cold_start_ms"])
    return {"cycles": cycles, "lost": lost, "cold": _pcts(cold), "warm": _pcts(warm), "instantiate": _pcts(made),
            "cold_starts": _health(port)["instances"]["digits"]["cold_starts"]}


def _burst(clients: e2e.Clients, system: e2e.System, images: list[list[int]], labels: list[int], n: int,
           tag: str = "burst") -> dict:
    clients.reset()
    assert system.proc is not None
    name, system.name = system.name, f"{system.name}-{tag}"  # e2e names the burst's event ids after it
    try:
        return e2e._burst(clients, system, _topic(name), images, labels, n, {name: system.proc.pid})
    finally:
        system.name = name


def _memory(clients: e2e.Clients, system: e2e.System, port: int, images: list[list[int]], labels: list[int],
            n: int, idle_s: float) -> dict[str, Any]:
    assert system.proc is not None
    pid = system.proc.pid
    _wait(lambda: _instances(port) == 0, idle_s * 20 + 5, "the pool scaled to zero")
    at_zero_before = _rss_anon_mb(pid)
    burst = _burst(clients, system, images, labels, n)
    pool = _health(port)["instances"]["digits"]  # read at once: the instances idle out after idle_s
    before = _rss_anon_mb(pid)
    _wait(lambda: _instances(port) == 0, idle_s * 20 + 5, "the pool scaled to zero")
    time.sleep(0.2)
    after = _rss_anon_mb(pid)
    held = pool["instances"] * pool["instance_mb"]
    freed = before - after
    return {"instances": pool["instances"], "instance_mb": pool["instance_mb"], "held_mb": held,
            "rss_anon_mb_at_zero_before": at_zero_before, "rss_anon_mb_scaled_up": before,
            "rss_anon_mb_scaled_to_zero": after, "freed_mb": freed, "freed_share": freed / held if held else None,
            "burst_lost": burst["lost"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    say = (lambda _m: None) if args.json_only else (lambda m: print(m, file=sys.stderr))
    e2e.ensure_built(e2e.FUNCTION)
    images, labels = e2e._digits()
    doc: dict[str, Any] = {"broker": "stock" if args.stock else "tuned (set_tcp_nodelay true)",
                           "idle_s": args.idle_s, "targets": TARGETS}
    variants = {"elastic": f"min_instances = 0\nmax_instances = 4\nidle_s = {args.idle_s}",
                "hold": "min_instances = 0\nmax_instances = 4\nidle_s = 3",
                "fixed": "instances = 4"}
    with LocalBroker(tuned=not args.stock) as broker, tempfile.TemporaryDirectory(prefix="edgefn-bench-") as tmp:
        work = Path(tmp)
        cache = work / "components"  # one compiled-component cache for all: a cached component
        cache.mkdir()
        say("compiling the digits component for this CPU into the cache (once)")
        with Runtime(cache) as runtime:
            runtime.load(e2e.FUNCTION / "build" / "digits.wasm")
        systems: dict[str, e2e.System] = {}
        ports: dict[str, int] = {}
        clients = e2e.Clients(broker.port)
        try:
            for name, limits in variants.items():
                (work / name).mkdir()
                (work / name / "components").symlink_to(cache.resolve(), target_is_directory=True)
                ports[name] = _free_port()
                systems[name] = e2e.edgefn_run(name, broker.url, work, [_variant(work / f"fn-{name}", name, limits)],
                                               "--metrics-port", str(ports[name]))
                say(f"{name}: starting the daemon ({limits.replace(chr(10), ', ')})")
                systems[name].start()
                clients.reset()
                e2e._wait_ready(clients, systems[name], _topic(name), images)
            elastic, hold, fixed = systems["elastic"], systems["hold"], systems["fixed"]
            c = doc["cold_start"] = _cold_starts(clients, elastic, ports["elastic"], images, args.cycles, args.idle_s)
            say(f"cold start: p50 {c['cold']['p50_ms']:.1f} ms, p99 {c['cold']['p99_ms']:.1f} ms (warm p50 "
                f"{c['warm']['p50_ms']:.1f} ms; instantiation p50 {c['instantiate']['p50_ms']:.1f} ms), lost {c['lost']}")
            m = doc["memory"] = _memory(clients, hold, ports["hold"], images, labels, args.burst, 3.0)
            say(f"memory: {m['instances']} instances held {m['held_mb']:.1f} MiB by the daemon's measure; scaling "
                f"to zero freed {m['freed_mb']:.1f} MiB of RssAnon ({(m['freed_share'] or 0) * 100:.0f} %)")
            rounds: dict[str, list[dict[str, Any]]] = {"elastic": [], "fixed": []}
            for r in range(args.rounds):
                for name, system in (("elastic", elastic), ("fixed", fixed)):
                    _wait(lambda p=ports[name], n=name: n == "fixed" or _instances(p) == 0, args.idle_s * 20 + 5,
                          "the elastic pool scaled to zero")
                    rounds[name].append(_burst(clients, system, images, labels, args.burst, f"burst{r}"))
                    b = rounds[name][-1]
                    say(f"burst {r + 1} of {args.burst}, {name}: {b['throughput_eps']:,.0f} events/s, lost {b['lost']}")
            for name, runs in rounds.items():
                ordered = sorted(runs, key=lambda b: b["throughput_eps"])
                doc[f"burst_{name}"] = {"median": ordered[len(ordered) // 2], "throughputs_eps":
                                        [b["throughput_eps"] for b in runs], "lost": sum(b["lost"] for b in runs)}
            time.sleep(max(1.0, args.idle_s * 4))
            for name in ("elastic", "fixed"):
                proc = systems[name].proc
                assert proc is not None
                doc[f"idle_{name}"] = {"instances": _instances(ports[name]), "rss_anon_mb": _rss_anon_mb(proc.pid)}
            say(f"idle after the bursts: elastic {doc['idle_elastic']}, fixed {doc['idle_fixed']}")
        finally:
            clients.close()
            for name, system in systems.items():
                doc.setdefault("exit_status", {})[name] = system.stop()
    e, f = doc["burst_elastic"]["median"], doc["burst_fixed"]["median"]
    doc["summary"] = {
        "cold_p50_ms": doc["cold_start"]["cold"]["p50_ms"], "cold_p99_ms": doc["cold_start"]["cold"]["p99_ms"],
        "warm_p50_ms": doc["cold_start"]["warm"]["p50_ms"],
        "instantiate_p50_ms": doc["cold_start"]["instantiate"]["p50_ms"],
        "freed_share": doc["memory"]["freed_share"],
        # What four warm instances hold, apart from the daemon's own estimate.
        "idle_rss_anon_mb_fixed_minus_elastic": doc["idle_fixed"]["rss_anon_mb"] - doc["idle_elastic"]["rss_anon_mb"],
        "burst_eps_elastic": e["throughput_eps"], "burst_eps_fixed": f["throughput_eps"],
        "burst_throughput_ratio_elastic_over_fixed": e["throughput_eps"] / max(f["throughput_eps"], 1e-9),
        "lost": doc["cold_start"]["lost"] + doc["memory"]["burst_lost"] + doc["burst_elastic"]["lost"]
        + doc["burst_fixed"]["lost"],
    }
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--idle-s", type=float, default=0.3)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stock", action="store_true", help="a stock broker (Nagle on) instead of a tuned one")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    try:
        doc = run(args)
    except Exception:  # noqa: BLE001 - a benchmark reports what failed to run
        traceback.print_exc()
        return 1
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    e2e.write_results(RESULTS, doc)
    print(json.dumps(doc["summary"] if not args.json_only else doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
