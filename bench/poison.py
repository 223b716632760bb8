"""Poison benchmark: what payloads that trap the guest cost the good events batched with them.

One process, a real `FunctionSandbox` of the digits example (its model, one instance, the
manifest's limits) fed straight through `handle_batch` in batches of the manifest's max_batch
(32), as the daemon's workers do when events queue up. The poison is real: JSON nested deep
overflows the guest's stack in its json parser (a trap); each poison event carries its own id, so
no two are the same bytes. Good events are held-out digits images. Two kinds of poison (--mode):

  fixed     4 kB nested 2000 levels deep: every poison event has the same shape;
  varying   nested 1,100 to 65,000 levels deep (log-uniform: as many in 1,100-2,200 as in
            32,000-65,000), so the poison changes its shape as well as its bytes. The guest
            overflows from about 1,200 levels on; shallower ones it answers with an error.

For each poison share (0 %, 10 %, 50 %: 1:1) and each of four sandboxes, in the same run:

  before      a failed batch runs again event by event, each alone (the old handle_batch);
  bisect      a failed batch is halved until each culprit is alone; no quarantine;
  alone+q     quarantine (a payload that trapped 3 times is refused, and JSON as deep as 3 that
              overflowed the stack in the same frames; a suspect runs alone), but a failed batch runs
              event by event: what bisect adds to quarantine;
  after       bisect and quarantine (FunctionSandbox as it is).

it prints the good events' throughput per CPU second of the process (the figure that holds on a
shared machine; wall-clock events/s beside it), its ratio to the same sandbox at 0 %, how many
guest calls and new instances the run took, and how the poison events ended. Each sandbox is
fresh and serves the stream twice: `first` includes learning the poison (its first traps),
`steady` is the same sandbox on a second stream whose poison has other ids (so other bytes).
Each cell is the best of --repeats sandboxes. Every answer is checked (good: a result for its
event, or an error that is counted and printed; poison: an error). Target: good throughput at 10 % poison >= 0.8x the throughput at 0 %
(the `after` sandbox), in both passes and both modes. The clean (0 %) cells serve both modes.

    .venv/bin/python bench/poison.py [--good N] [--repeats N] [--batch N] [--mode fixed|varying|both]
                                     [--sandboxes after,before,...] [--shares 0,0.1] [--json-only]

Results also go to bench/results/poison.json. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the digits images and the build step)

from edgefn.errors import FunctionError  # noqa: E402
from edgefn.events import Event, Message  # noqa: E402
from edgefn.functions.build import component_path  # noqa: E402
from edgefn.functions.host import FunctionHost  # noqa: E402
from edgefn.functions.manifest import load_manifest  # noqa: E402
from edgefn.functions.sandbox import FunctionSandbox, Runtime, _lowered  # noqa: E402
from edgefn.functions.state import StateStore  # noqa: E402
from edgefn.inference.registry import ModelRegistry  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "poison.json"
SHARES = (0.0, 0.1, 0.5)
DEPTH = 2000  # the guest's stack overflows from about 1,200 levels on
VARYING = (1100, 65000)  # the depths of --mode varying
MODES = ("fixed", "varying")
TARGET = 0.8


class Before(FunctionSandbox):
    """handle_batch as it was before bisect and quarantine."""

    def handle_batch(self, events: list[Event]) -> list[list[Message] | FunctionError]:
        if len(events) > 1 and self._batches:
            try:
                answers = self._call(lambda inst: inst.handle_batch([_lowered(e) for e in events]), len(events))
            except FunctionError:
                answers = None
            if answers is not None and len(answers) == len(events):
                return [self._answer(ok, value) for ok, value in answers]
        return [self._one(e) for e in events]


class AloneWithQuarantine(FunctionSandbox):
    """Quarantine and suspects as they are; a failed batch runs event by event instead of bisected."""

    def _bisect(self, events: list[Event]) -> list[list[Message] | FunctionError]:
        return Before.handle_batch(self, events)


class Counted:
    """Counts a sandbox's guest calls and new instances (the instances stay real)."""

    def __init__(self, sandbox: FunctionSandbox):
        self.calls = self.created = 0
        call, new_instance = sandbox._call, sandbox._new_instance

        def counting_call(*args: Any) -> Any:
            self.calls += 1
            return call(*args)

        def counting_new_instance() -> Any:
            self.created += 1
            return new_instance()

        sandbox._call, sandbox._new_instance = counting_call, counting_new_instance  # type: ignore[method-assign]


def _poison(event_id: str, depth: int) -> bytes:
    return f'{{"id": "{event_id}", "pixels": '.encode() + b"[" * depth + b"]" * depth + b"}"


def _events(images: list[list[int]], good: int, share: float, seed: int, mode: str = "fixed") -> list[Event]:
    """`good` digits events with poison mixed in at random places, `share` of all events; its depth
    fixed or varying (`mode`)."""
    rng = random.Random(seed)
    shallow, deepest = VARYING
    poison = round(good * share / (1 - share))
    kinds = ["good"] * good + ["poison"] * poison
    rng.shuffle(kinds)
    events, now = [], time.time() * 1000
    for i, kind in enumerate(kinds):
        event_id = f"{kind[0]}{seed}-{i}"
        if kind == "good":
            payload = e2e._payload(event_id, images[i % len(images)])
        else:
            depth = DEPTH if mode == "fixed" else round(shallow * (deepest / shallow) ** rng.random())
            payload = _poison(event_id, depth)
        events.append(Event(event_id, "sensors/bench/digits", payload, now))
    return events


def _run(sandbox: FunctionSandbox, events: list[Event], batch: int) -> dict[str, Any]:
    counted = Counted(sandbox)
    t0, c0 = time.perf_counter(), time.process_time()
    answers = [a for k in range(0, len(events), batch) for a in sandbox.handle_batch(events[k:k + batch])]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    endings: Counter[str] = Counter()
    failed: Counter[str] = Counter()  # good events answered with an error (a timeout on a starved machine)
    good = 0
    for event, answer in zip(events, answers, strict=True):
        if event.id.startswith("g"):
            if isinstance(answer, FunctionError):
                failed[answer.reason] += 1
                continue
            assert json.loads(answer[0].payload)["event_id"] == event.id
            good += 1
        else:
            assert isinstance(answer, FunctionError), f"{event.id} was answered {answer!r}"
            endings[answer.reason] += 1
    return {"good": good, "poison": len(events) - good, "cpu_s": cpu, "wall_s": wall,
            "good_per_cpu_s": good / cpu, "good_eps_wall": good / wall,
            "guest_calls": counted.calls, "instances_created": counted.created, "poison_endings": dict(endings),
            "good_failed": dict(failed)}


KINDS: dict[str, tuple[type[FunctionSandbox], dict[str, Any]]] = {
    "before": (Before, {"quarantine": False}), "bisect": (FunctionSandbox, {"quarantine": False}),
    "alone+q": (AloneWithQuarantine, {}), "after": (FunctionSandbox, {})}


def _cell(runtime: Runtime, made: tuple[Any, ...], kind: str, streams: dict[str, list[Event]],
          repeats: int, batch: int) -> dict[str, dict[str, Any]]:
    """The best of `repeats` fresh sandboxes of `kind`, each serving the warm-up then the streams in turn."""
    manifest, wasm, registry, images = made
    cls, options = KINDS[kind]
    runs: dict[str, list[dict[str, Any]]] = {pass_: [] for pass_ in streams}
    for _ in range(repeats):
        host = FunctionHost(manifest.name, registry, StateStore(":memory:"))
        sandbox = cls(runtime, manifest, wasm, host, max_instances=1, **options)
        try:
            _run(sandbox, _events(images, 300, 0.0, seed=1), batch)  # warm-up
            for pass_, events in streams.items():
                runs[pass_].append(_run(sandbox, events, batch))
        finally:
            sandbox.close()
    return {pass_: max(done, key=lambda r: r["good_per_cpu_s"]) for pass_, done in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--good", type=int, default=1000, help="good events in each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell, each on a fresh sandbox; the best counts")
    parser.add_argument("--batch", type=int, default=None, help="events per handle_batch (default: max_batch)")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both", help="the poison's depth: fixed, varying")
    parser.add_argument("--sandboxes", default=",".join(KINDS), help=f"which of {', '.join(KINDS)} (comma-separated)")
    parser.add_argument("--shares", default=",".join(f"{s:g}" for s in SHARES), help="poison shares; 0 is always run")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    modes = MODES if args.mode == "both" else (args.mode,)
    kinds = [k for k in args.sandboxes.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"no such sandbox: {', '.join(sorted(unknown))}")
    shares = sorted({0.0, *(float(s) for s in args.shares.split(",") if s)})
    e2e.ensure_built(e2e.FUNCTION)
    manifest = load_manifest(e2e.FUNCTION)
    batch = args.batch or manifest.limits.max_batch
    images, _ = e2e._digits()
    registry = ModelRegistry([e2e.ROOT / "models"])
    cells: dict[str, dict[str, Any]] = {}  # "mode/pass/sandbox@share"; the clean cells as mode "clean"
    with tempfile.TemporaryDirectory(prefix="edgefn-poison-") as tmp, Runtime(Path(tmp)) as runtime:
        made = (manifest, component_path(e2e.FUNCTION, manifest), registry, images)
        for share in shares:
            for mode in modes if share else ("clean",):
                streams = {pass_: _events(images, args.good, share, seed, mode if share else "fixed")
                           for pass_, seed in (("first", 15), ("steady", 16))}
                for kind in kinds:  # the sandboxes alternate within a mode and share: they see the same load
                    for pass_, cell in _cell(runtime, made, kind, streams, args.repeats, batch).items():
                        cells[f"{mode}/{pass_}/{kind}@{share:g}"] = cell
    for key, cell in cells.items():
        _, pass_kind = key.split("/", 1)
        cell["ratio_to_clean"] = cell["good_per_cpu_s"] / cells["clean/" + pass_kind.split("@")[0] + "@0"]["good_per_cpu_s"]
    at_10 = {f"{mode}/{pass_}": cells[f"{mode}/{pass_}/after@0.1"]["ratio_to_clean"]
             for mode in modes for pass_ in ("first", "steady") if f"{mode}/{pass_}/after@0.1" in cells}
    doc: dict[str, Any] = {
        "benchmark": "bench/poison.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "batch": batch, "depth": DEPTH, "varying_depth": list(VARYING), "modes": list(modes), "good": args.good,
        "repeats": args.repeats, "load_average": [round(x, 2) for x in os.getloadavg()], "cells": cells,
        "target": f"after: good throughput at 10 % poison >= {TARGET}x at 0 %",
        "after_ratio_at_10pct": at_10, "target_met": bool(at_10) and min(at_10.values()) >= TARGET,
    }
    e2e.write_results(RESULTS, doc)
    return e2e.report(doc, args.json_only, _show)


def _show(doc: dict[str, Any]) -> None:
    print(f"digits, batches of {doc['batch']}, poison: JSON nested {doc['depth']} deep (fixed) or "
          f"{doc['varying_depth'][0]:,}-{doc['varying_depth'][1]:,} deep (varying), each with its own id; "
          f"load average {doc['load_average']}")
    print(f"{'mode':7} {'pass':6} {'sandbox':8} {'poison':>6} {'good/cpu-s':>10} {'vs 0 %':>7} {'good/s wall':>11} "
          f"{'calls':>6} {'instances':>9}  poison ended as")
    for key, cell in sorted(doc["cells"].items(), key=lambda kv: kv[0].split("/")[1] == "steady"):
        mode, pass_, name, share = key.replace("@", "/").split("/")
        print(f"{mode:7} {pass_:6} {name:8} {float(share):6.0%} {cell['good_per_cpu_s']:10.0f} "
              f"{cell['ratio_to_clean']:6.2f}x {cell['good_eps_wall']:11.0f} {cell['guest_calls']:6d} "
              f"{cell['instances_created']:9d}  {cell['poison_endings']}"
              + (f"; good failed: {cell['good_failed']}" if cell["good_failed"] else ""))
    measured = ", ".join(f"{ratio:.2f}x {where}" for where, ratio in doc["after_ratio_at_10pct"].items())
    verdict = "met" if doc["target_met"] else "NOT met"
    print(f"target (after, 10 %): >= {TARGET}x; measured {measured or 'nothing (no after sandbox at 10 %)'}: {verdict}")
    print(f"results written to {RESULTS.relative_to(e2e.ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
