"""What usage metering costs: throughput with metering on against off, in the same run, in two places.

  guest path   in this process: the digits function's sandbox, its host (the real model) and the worker's
               metering hook (`Usage.call` ... `.done`, and `host.infer`'s clocks), events in batches of
               --batch. On and off alternate call by call over --rounds rounds of --events events, so that
               a machine busy with something else slows both alike; events per CPU second of the worker
               thread (and per wall second, noisier), the median round of each. The sharpest view: no
               broker, no journal, only the work metering adds to.
  daemon       (--daemon) `edgefn run` as a child process against a private mosquitto, once with metering
               (the default) and once with EDGEFN_METERING=false, each given --burst events at QoS1 (as
               bench/e2e.py's burst), alternating for --daemon-rounds rounds; the median throughput of each.

Target: overhead <= 3 % of throughput. Exits 0 whatever the figures; results also go to
bench/results/metering.json.

    .venv/bin/python bench/metering.py [--events N] [--rounds N] [--batch N] [--daemon] [--burst N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FUNCTION = ROOT / "examples" / "functions" / "digits"
MODELS = ROOT / "models"
RESULTS = ROOT / "bench" / "results" / "metering.json"
TARGET_OVERHEAD = 0.03


def guest_path(events: int, rounds: int, batch: int) -> dict[str, Any]:
    from e2e import _digits, _payload, ensure_built

    from edgefn.events import Event
    from edgefn.functions.build import component_path
    from edgefn.functions.host import FunctionHost
    from edgefn.functions.manifest import load_manifest
    from edgefn.functions.sandbox import FunctionSandbox, Runtime
    from edgefn.functions.state import StateStore
    from edgefn.inference.registry import ModelRegistry
    from edgefn.observe.metrics import Metrics

    ensure_built(FUNCTION)
    images, _ = _digits()
    manifest = load_manifest(FUNCTION)
    metrics = Metrics()
    usage = metrics.usage
    with tempfile.TemporaryDirectory() as cache, Runtime(Path(cache)) as runtime:
        host = FunctionHost(manifest.name, ModelRegistry([MODELS]), StateStore(":memory:"), metrics=metrics)
        sandbox = FunctionSandbox(runtime, manifest, component_path(FUNCTION, manifest), host, instances=1)
        batches = [[Event(f"e{i + j}", "sensors/bench/digits", _payload(f"e{i + j}", images[(i + j) % len(images)]),
                          time.time() * 1000) for j in range(batch)] for i in range(0, events, batch)]

        def call(events_: list[Event]) -> None:
            metered = usage.call(manifest.name, events_)  # the worker's hook, as dispatch/worker.py has it
            results = sandbox.handle_batch(events_)
            metered.done(results)

        for events_ in batches:  # warm-up: instances, model, caches
            call(events_)
        # On and off alternate call by call (with a second "off", whose difference from the first is the
        # noise floor of the method on this machine), so that whatever else the machine does falls on all
        # alike; CPU time of this thread (the guest call runs on it, inference too) is what metering adds to,
        # and unlike wall time it does not count the time another process had the core.
        modes = ("on", "off", "off-again")
        rates: dict[str, list[float]] = {m: [] for m in modes}
        wall_rates: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(rounds):
            cpu = dict.fromkeys(modes, 0.0)
            wall = dict.fromkeys(modes, 0.0)
            count = dict.fromkeys(modes, 0)
            for n, events_ in enumerate(batches):
                mode = modes[(n + i) % len(modes)]
                usage.enabled = mode == "on"
                c0, w0 = time.thread_time(), time.perf_counter()
                call(events_)
                cpu[mode] += time.thread_time() - c0
                wall[mode] += time.perf_counter() - w0
                count[mode] += len(events_)
            for mode in modes:
                rates[mode].append(count[mode] / cpu[mode])
                wall_rates[mode].append(count[mode] / wall[mode])
        usage.enabled = True
        hook_us = _hook_cpu_us(usage, batches[0], sandbox.handle_batch(batches[0]))
        sandbox.close()
    wall_on, wall_off = statistics.median(wall_rates["on"]), statistics.median(wall_rates["off"])
    off, again = statistics.median(rates["off"]), statistics.median(rates["off-again"])
    return _compare(rates, {"measure": "events per CPU second of the worker thread", "events_per_round": events,
                            "batch": batch, "noise_floor": abs(off - again) / off,
                            "wall_events_per_s": {"on": wall_on, "off": wall_off},
                            "wall_overhead": (wall_off - wall_on) / wall_off, "wall_rounds": wall_rates,
                            "hook_cpu_us": hook_us})


def _hook_cpu_us(usage: Any, events: list[Any], answers: list[Any], n: int = 50_000) -> dict[str, float]:
    """CPU microseconds of the hook alone: one guest call's booking, and one infer call's (with its clocks)."""
    started = time.thread_time()
    for _ in range(n):
        usage.call("bench", events).done(answers)
    call = (time.thread_time() - started) / n * 1e6
    started = time.thread_time()
    for _ in range(n):
        w, c = time.perf_counter(), time.thread_time()
        usage.inferred("bench", "local", time.perf_counter() - w, time.thread_time() - c)
    infer = (time.thread_time() - started) / n * 1e6
    return {"per_guest_call": round(call, 2), "per_infer_call": round(infer, 2)}


def daemon_burst(burst: int, rounds: int) -> dict[str, Any]:
    import e2e
    from e2e import Clients, _burst, _digits, _wait_ready, edgefn_run, ensure_built

    from edgefn.mqtt.local_broker import LocalBroker

    ensure_built(FUNCTION)
    e2e.READY_TIMEOUT_S = 300.0  # the first start of each compiles the component (slow on a busy machine)
    images, labels = _digits()
    rates: dict[str, list[float]] = {"on": [], "off": []}
    lost = {"on": 0, "off": 0}
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        clients = Clients(broker.port)
        try:
            for i in range(rounds):
                for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    # One state dir per mode: its compiled component is reused by the next round (drained
                    # at each stop, its journal is empty again).
                    system = edgefn_run(f"metering-{mode}", f"mqtt://127.0.0.1:{broker.port}", Path(tmp), [FUNCTION])
                    os.environ["EDGEFN_METERING"] = "true" if mode == "on" else "false"  # the child's setting
                    try:
                        system.start()
                    finally:
                        os.environ.pop("EDGEFN_METERING", None)
                    try:
                        clients.reset()
                        topic = f"sensors/bench-{system.name}/digits"
                        _wait_ready(clients, system, topic, images)
                        assert system.proc is not None
                        result = _burst(clients, system, topic, images, labels, burst, {system.name: system.proc.pid})
                    finally:
                        system.stop()
                    rates[mode].append(result["throughput_eps"])
                    lost[mode] += result["lost"]
                    print(f"  daemon round {i + 1}, metering {mode}: {result['throughput_eps']:,.0f} events/s, "
                          f"lost {result['lost']}", file=sys.stderr)
        finally:
            clients.close()
    return _compare(rates, {"burst": burst, "lost": lost})


def _compare(rates: dict[str, list[float]], extra: dict[str, Any]) -> dict[str, Any]:
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    overhead = (off - on) / off
    return {"events_per_s": {"on": on, "off": off}, "rounds": rates, "overhead": overhead,
            "meets_target": overhead <= TARGET_OVERHEAD, **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="events per round (guest path)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each, on and off (guest path)")
    parser.add_argument("--batch", type=int, default=1, help="events per guest call (1: the dearest case)")
    parser.add_argument("--daemon", action="store_true", help="also the daemon under a burst, on and off")
    parser.add_argument("--burst", type=int, default=3000, help="events per daemon burst")
    parser.add_argument("--daemon-rounds", type=int, default=2, help="bursts of each, on and off")
    args = parser.parse_args()
    doc: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "platform": platform.platform()},
                           "target_overhead": TARGET_OVERHEAD}
    doc["guest_path"] = guest = guest_path(args.events, args.rounds, args.batch)
    print(f"guest path, batches of {args.batch}: {guest['events_per_s']['on']:,.0f} events per CPU second metered, "
          f"{guest['events_per_s']['off']:,.0f} not: overhead {guest['overhead'] * 100:+.2f} % "
          f"(wall time: {guest['wall_overhead'] * 100:+.2f} %); noise floor (off against off) "
          f"{guest['noise_floor'] * 100:.2f} %; the hook alone: {guest['hook_cpu_us']['per_guest_call']} us CPU "
          f"per guest call, {guest['hook_cpu_us']['per_infer_call']} us per infer call")
    if args.daemon:
        doc["daemon"] = daemon = daemon_burst(args.burst, args.daemon_rounds)
        print(f"daemon burst of {args.burst}: {daemon['events_per_s']['on']:,.0f} events/s metered, "
              f"{daemon['events_per_s']['off']:,.0f} not: overhead {daemon['overhead'] * 100:+.2f} %")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
