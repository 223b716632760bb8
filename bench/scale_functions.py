"""Many functions in one daemon: start time, memory and answers with 1, 10 and 50 copies of digits.

For each count, a private stock mosquitto (`LocalBroker()`) and `edgefn run` as a child process with that
many copies of the digits example (d0, d1, ...: they differ only in their name and trigger topic; each calls
the digits model under its own name, as the example calls the model named like the function). The compiled
component is cached once, before the first daemon starts, and shared: every daemon maps it, none compiles.

  start    from the spawn, one event every 0.25 s to each function that has not answered yet: the seconds
           to the first answer of every function, and how many functions answered within --deadline.
  memory   once every function answered: the daemon's RSS and PSS (/proc/PID/smaps_rollup: PSS shares each
           page among the mappings and processes that map it, so the compiled component, mapped once per
           function, counts once) and its own anonymous memory; per function, the growth from the
           smallest count to the largest.
  burst    --events events per function, interleaved, at QoS1 (1,000 for 50 functions at the default);
           answered within 5 s of the last publish, and how many functions answered all of theirs.
  budget   the daemon's memory budget (the device profile's `memory_budget_mb`), what its instances hold
           of it by its own count, and what it counts one instance for (/healthz).

    .venv/bin/python bench/scale_functions.py [--counts 1,10,50] [--events 20] [--deadline 60] [--json-only]

About 2 minutes. Results also go to bench/results/scale_functions.json. Exit status 0 whatever the figures; 1
when a count could not run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
import e2e  # noqa: E402  (child processes, building, digits images)
import footprint  # noqa: E402  (the results subscriber and the sensor)

from edgefn.functions.sandbox import Runtime  # noqa: E402
from edgefn.mqtt.local_broker import LocalBroker  # noqa: E402
from tests.conftest import digits_copies  # noqa: E402  (the copies the tests run too)

RESULTS = e2e.ROOT / "bench" / "results" / "scale_functions.json"
BURST_WAIT_S = 5.0  # the burst's answers counted this long after its last publish (as the issue measured)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rollup(pid: int) -> dict[str, float]:
    """The daemon's resident memory in MiB: RSS, PSS, and its own anonymous memory."""
    kb = {line.split(":")[0]: int(line.split()[1])
          for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
    return {"rss_mb": footprint._mb(kb["Rss"]), "pss_mb": footprint._mb(kb["Pss"]),
            "anonymous_mb": footprint._mb(kb.get("Anonymous", 0))}


def _health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 503 (degraded): its document all the same
        return json.loads(exc.read())


def _start(daemon: e2e.System, results: footprint.Results, sensor: Any, names: list[str], images: list[list[int]],
           deadline_s: float) -> dict[str, Any]:
    """Spawn the daemon and probe every function until each has answered or the deadline passes."""
    results.reset()
    t0 = time.perf_counter()
    daemon.start()
    while time.perf_counter() - t0 < deadline_s:
        daemon.check()
        with results.lock:
            waiting = [n for n in names if n not in results.first]
        if not waiting:
            break
        for n in waiting:
            sensor.publish(f"sensors/sc/{n}", json.dumps({"id": f"probe-{n}-{time.monotonic_ns()}",
                                                          "pixels": images[0]}), qos=1)
        time.sleep(0.25)  # each answer's time is taken as it arrives (Results)
    with results.lock:
        first = dict(results.first)
    every = max(first.values()) - t0 if len(first) == len(names) else None
    return {"start_all_s": None if every is None else round(every, 2), "answered_within_deadline": len(first)}


def _burst(results: footprint.Results, sensor: Any, names: list[str], images: list[list[int]],
           per_function: int) -> dict[str, Any]:
    """per_function events to every function, interleaved; what is answered within BURST_WAIT_S after."""
    results.reset()
    ids = {f"burst-{n}-{k}": n for k in range(per_function) for n in names}
    infos = [sensor.publish(f"sensors/sc/{n}", json.dumps({"id": event_id, "pixels": images[k % len(images)]}),
                            qos=1) for k, (event_id, n) in enumerate(ids.items())]
    for info in infos:
        info.wait_for_publish(30)
    results.wait_until(lambda: len(results.answered) >= len(ids), BURST_WAIT_S)
    with results.lock:
        answered = set(results.answered) & set(ids)
    short = {n for event_id, n in ids.items() if event_id not in answered}
    return {"sent": len(ids), "answered": len(answered), "functions_all_answered": len(names) - len(short)}


def run_count(n: int, args: argparse.Namespace, cache: Path, images: list[list[int]], say: Any) -> dict[str, Any]:
    names = [f"d{i}" for i in range(n)]
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edgefn-scale-") as tmp:
        work = Path(tmp)
        functions, models = digits_copies(e2e.FUNCTION, work, n)
        (work / "daemon").mkdir()
        (work / "daemon" / "components").symlink_to(cache.resolve(), target_is_directory=True)
        port = _free_port()
        daemon = e2e.edgefn_run("daemon", broker.url, work, [functions], "--models", str(models),
                                "--metrics-port", str(port), log_level="warning")
        results, sensor = footprint.Results(broker.port), footprint._sensor(broker.port)
        try:
            row: dict[str, Any] = {"functions": n}
            row.update(_start(daemon, results, sensor, names, images, args.deadline))
            assert daemon.proc is not None
            row["at_start"] = _rollup(daemon.proc.pid)
            say(f"{n} functions: every one answered {row['start_all_s']} s after the spawn "
                f"({row['answered_within_deadline']} of {n} within {args.deadline:g} s); {row['at_start']}")
            row["burst"] = _burst(results, sensor, names, images, args.events)
            row["after_burst"] = _rollup(daemon.proc.pid)
            health = _health(port)
            row["budget"] = health.get("memory_budget")
            row["instance_mb_median"] = statistics.median(
                pool["instance_mb"] for pool in health.get("instances", {}).values()) if n else None
            b = row["burst"]
            say(f"  burst: {b['answered']} of {b['sent']} answered within {BURST_WAIT_S:g} s, {b['functions_all_answered']}"
                f" of {n} functions answered all theirs; {row['after_burst']}; budget {row['budget']}, "
                f"an instance counted {row['instance_mb_median']} MiB")
            return row
        finally:
            daemon.stop()
            sensor.loop_stop()
            results.close()


def _per_function(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The growth per function added, from the smallest count that ran to the largest."""
    ran = sorted((r["functions"], r) for r in rows.values() if "after_burst" in r)
    if len(ran) < 2:
        return {}
    (a, small), (b, large) = ran[0], ran[-1]
    return {f"{phase}_{key}_per_function": round((large[phase][key] - small[phase][key]) / (b - a), 2)
            for phase in ("at_start", "after_burst") for key in ("rss_mb", "pss_mb", "anonymous_mb")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,10,50", help="how many copies of digits, one daemon each")
    parser.add_argument("--events", type=int, default=20, help="events per function in the burst")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds for every function to answer")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c]
    say = (lambda _m: None) if args.json_only else (lambda m: print(m, file=sys.stderr))
    e2e.ensure_built(e2e.FUNCTION)
    images, _ = e2e._digits()
    doc: dict[str, Any] = {"benchmark": "bench/scale_functions.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "config": {"counts": counts, "events_per_function": args.events,
                                      "deadline_s": args.deadline, "burst_wait_s": BURST_WAIT_S}, "counts": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="edgefn-scale-cache-") as cache_dir:
        cache = Path(cache_dir)
        say("compiling the digits component for this CPU into the cache (once)")
        with Runtime(cache) as runtime:
            runtime.load(e2e.FUNCTION / "build" / "digits.wasm")
        for n in counts:
            try:
                doc["counts"][str(n)] = run_count(n, args, cache, images, say)
            except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
                if not isinstance(exc, e2e.BenchError):
                    traceback.print_exc()
                doc["counts"][str(n)] = {"error": str(exc)}
                failed = True
    doc["summary"] = _per_function(doc["counts"])
    e2e.write_results(RESULTS, doc)
    print(json.dumps(doc if args.json_only else doc["summary"], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
