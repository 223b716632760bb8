"""Functions on every core: a journal full of waiting events, answered with 0, 1 and 2 worker processes.

For each --workers value (0: the functions on threads in the daemon's own process, as before worker
processes; N: N worker processes), in a fresh state folder:

  1. --events digits events (default 20,000; scikit-learn's held-out images, unique ids) are written
     into the daemon's journal with the journal's own API, as if a daemon had journaled and acknowledged
     them and then been restarted;
  2. a daemon (in this process, examples/functions/digits, a stock mosquitto on loopback: its answers
     are published there, to no subscriber) is started and answers them;
  3. measured: seconds from start() to the first answer and to the last, the rate between them
     (events/s), the CPU seconds of the daemon's process and of its worker processes (Linux /proc)
     per 1,000 events, and their RSS and PSS at the end (this process is the daemon's: it counts the
     bench's own imports too, scikit-learn's digits among them).

Target (issue: functions on every core): 2 workers answer at >= 1.7x the rate of 1 worker. The
machine's cores are shared with the broker (which takes every answer) and this process's intake; the
report says how many cores there are. CPU per event of intake and of a worker also say what a board
with more cores could do: intake's share bounds the rate however many workers there are.

    .venv/bin/python bench/scale.py [--events N] [--workers 0,1,2] [--json-only]

Results also go to bench/results/scale.json. Takes about a minute per --workers value on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e import FUNCTION, MODELS, _children, _cpu_seconds, _digits, _payload, ensure_built  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"
TARGET_RATIO = 1.7
DEADLINE_S = 600.0


def _fill(journal: Path, n: int) -> None:
    """n digits events in the journal, journaled and acknowledged as a daemon would have."""
    from edgefn.journal.inbox import Inbox

    images, _ = _digits()
    with Inbox(journal) as inbox:
        for start in range(0, n, 1000):
            now = time.time() * 1000
            inbox.append_many([("sensors/bench/digits", _payload(f"s{i}", images[i % len(images)]), now)
                               for i in range(start, min(n, start + 1000))])


def _handled(daemon: Any) -> int:
    return int(sum(sample.value for metric in daemon.metrics.events_handled.collect()
                   for sample in metric.samples if sample.name.endswith("_total")))


def restart(workers: int, n: int, cache: Path, say: Any) -> dict[str, Any]:
    from edgefn.config import load_settings
    from edgefn.daemon import Daemon
    from edgefn.mqtt.local_broker import LocalBroker

    with tempfile.TemporaryDirectory(prefix="edgefn-scale-") as tmp, LocalBroker() as broker:
        state = Path(tmp) / "state"
        state.mkdir()
        (state / "components").symlink_to(cache, target_is_directory=True)
        _fill(state / "inbox.sqlite", n)
        settings = load_settings(broker=broker.url, functions=[FUNCTION], models=[MODELS], state_dir=state,
                                 client_id=f"bench-scale-{workers}", workers=workers)
        cpu0, started = time.process_time(), time.perf_counter()
        daemon = Daemon(settings)
        daemon.start()
        first = None
        try:
            while (done := _handled(daemon)) < n and time.perf_counter() - started < DEADLINE_S:
                if first is None and done:
                    first = time.perf_counter(), done
                time.sleep(0.02)
            finished = time.perf_counter()
            intake_cpu = time.process_time() - cpu0
            workers_now = [pid for pid in _children(os.getpid()) if _is_worker(pid)]
            worker_cpu = sum(_cpu_seconds(pid) or 0.0 for pid in workers_now)
            memory = {"daemon": _memory_mb(os.getpid()), "workers": [_memory_mb(pid) for pid in workers_now]}
        finally:
            daemon.stop(drain_timeout=5)
    assert first is not None, "nothing was answered"
    rate = (done - first[1]) / max(finished - first[0], 1e-9)
    row = {"workers": workers, "events": n, "answered": done, "first_answer_s": round(first[0] - started, 2),
           "all_answered_s": round(finished - started, 2), "rate_eps": round(rate, 1),
           "daemon_cpu_s_per_1000": round(intake_cpu / done * 1000, 3),
           "worker_cpu_s_per_1000": round(worker_cpu / done * 1000, 3),
           "rss_mb": round(memory["daemon"]["Rss"] + sum(m["Rss"] for m in memory["workers"]), 1),
           "pss_mb": round(memory["daemon"]["Pss"] + sum(m["Pss"] for m in memory["workers"]), 1),
           "memory_mb": memory}
    say(f"workers {workers}: {row['rate_eps']:,.0f} events/s after the first answer at {row['first_answer_s']} s; "
        f"CPU per 1,000 events: daemon {row['daemon_cpu_s_per_1000']} s, workers {row['worker_cpu_s_per_1000']} s; "
        f"RSS {row['rss_mb']} MiB, PSS {row['pss_mb']} MiB (daemon and workers, this process included)")
    return row


def _memory_mb(pid: int) -> dict[str, float]:
    """Rss and Pss of a process (smaps_rollup), MiB."""
    rollup = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        rollup[key] = int(value.split()[0]) / 1024
    return {"Rss": round(rollup["Rss"], 1), "Pss": round(rollup["Pss"], 1)}


def _is_worker(pid: int) -> bool:
    try:
        return b"edgefn.dispatch.child" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    def say(msg: str) -> None:
        if not args.json_only:
            print(msg, file=sys.stderr, flush=True)

    ensure_built(FUNCTION)
    cache = Path(tempfile.gettempdir()) / "edgefn-bench-components"  # compiled once, kept for the next run
    cache.mkdir(exist_ok=True)
    rows = [restart(w, args.events, cache, say) for w in args.workers]
    by = {r["workers"]: r for r in rows}
    summary: dict[str, Any] = {}
    if 1 in by and 2 in by:
        summary["rate_ratio_2_to_1"] = round(by[2]["rate_eps"] / by[1]["rate_eps"], 2)
        summary["target_ratio_min"] = TARGET_RATIO
    if 0 in by and 1 in by:
        summary["rate_ratio_1_to_in_process"] = round(by[1]["rate_eps"] / by[0]["rate_eps"], 2)
    if 1 in by:  # what more cores would give: intake's CPU per event bounds the rate
        r = by[1]
        summary["intake_bound_eps"] = round(1000 / r["daemon_cpu_s_per_1000"]) if r["daemon_cpu_s_per_1000"] else None
        summary["per_worker_eps"] = round(1000 / r["worker_cpu_s_per_1000"]) if r["worker_cpu_s_per_1000"] else None
        if summary["intake_bound_eps"] and summary["per_worker_eps"]:
            summary["predicted_3_workers_eps"] = min(summary["intake_bound_eps"], 3 * summary["per_worker_eps"])
    doc = {"benchmark": "bench/scale.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "env": {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "python": platform.python_version()},
           "rows": rows, "summary": summary}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events waiting in the journal")
    parser.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2],
                        help="comma-separated worker counts to measure (0: in the daemon's process)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    doc = run(parser.parse_args(argv))
    print(json.dumps(doc if parser.parse_args(argv).json_only else doc["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
