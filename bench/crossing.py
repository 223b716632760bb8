"""What one sandboxed call is made of: the guest's own Python, the model, and the two crossings of the boundary.

A copy of examples/functions/digits whose `handle_batch` times itself, and its `host.infer` call, with
the guest's clock (WASI's monotonic clock) and puts both figures in its answer, is built and run in
this process with the real model (no broker, no daemon). The host times the export call and its
`host.infer` on its side. Per event, for batches of 1 and of 32 (the batch a burst gives a worker):

  guest Python      the guest's handle_batch, less host.infer as the guest saw it
  model             host.infer as the host saw it (registry, batcher, onnxruntime)
  infer crossing    host.infer as the guest saw it, less as the host saw it (the guest's tensors out, the
                    outputs back: componentize-py, wasmtime's values, the host's codecs, the callback)
  export crossing   the export call, less the guest's handle_batch (the events in, the messages out)
  around            the sandbox's own work around the call (instance, deadline, checks of the outputs)

    .venv/bin/python bench/crossing.py [--calls 300] [--pad BYTES] [--json-only]

Takes about a minute (the copy is built with componentize-py first). Results also go to
bench/results/crossing.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (the paths, the results file, the report)

RESULTS = e2e.ROOT / "bench" / "results" / "crossing.json"
BATCHES = (1, 32)
WARM_CALLS = 100  # a new instance's first calls grow its heap (page faults): not what is measured

# Edits to the digits function's app.py: handle_batch timed as a whole, host.infer around its call, both
# figures (of the previous call: they are known only once its answers are made) in each answer.
_TIMED = (
    ('    def handle_batch(self, events):\n',
     '    def handle_batch(self, events):\n'
     '        t_in = time.perf_counter()\n'
     '        answers = self._handle_batch(events)\n'
     '        LAST[0], LAST[1] = time.perf_counter() - t_in, INFER[0]\n'
     '        return answers\n\n'
     '    def _handle_batch(self, events):\n'),
    ('                result = host.infer(',
     '                t_infer = time.perf_counter()\n'
     '                result = host.infer('),
    ('            label_t, probs_t = result.outputs\n',
     '            INFER[0] = time.perf_counter() - t_infer\n'
     '            label_t, probs_t = result.outputs\n'),
    ('_info = None', '_info = None\nLAST = [0.0, 0.0]\nINFER = [0.0]'),
    ('        "latency_ms":', '        "guest_s": LAST[0], "guest_infer_s": LAST[1],\n        "latency_ms":'),
)


def timed_copy(dest: Path) -> Path:
    """The digits function, copied and edited to time itself, built."""
    from edgefn.functions.build import build

    fn = dest / "digits"
    shutil.copytree(e2e.FUNCTION, fn, ignore=shutil.ignore_patterns("build", "__pycache__"))
    app = (fn / "app.py").read_text()
    for old, new in _TIMED:
        if old not in app:
            raise e2e.BenchError(f"examples/functions/digits/app.py changed: {old.strip()!r} is not in it")
        app = app.replace(old, new, 1)
    (fn / "app.py").write_text(app)
    build(fn)
    return fn


def measure(fn: Path, cache: Path, calls: int, pad: int = 0) -> dict[str, Any]:
    import numpy as np

    from edgefn.events import Event
    from edgefn.functions import _boundary
    from edgefn.functions.build import component_path
    from edgefn.functions.host import FunctionHost
    from edgefn.functions.manifest import load_manifest
    from edgefn.functions.sandbox import FunctionSandbox, Runtime
    from edgefn.functions.state import StateStore
    from edgefn.inference.registry import ModelRegistry

    # The model's validation images: scikit-learn is not imported, its objects would slow this process's GC.
    images = np.load(e2e.MODELS / "digits" / "validation.npz")["x"].astype(int).tolist()
    manifest = load_manifest(fn)
    host = FunctionHost(manifest.name, ModelRegistry([e2e.MODELS]), StateStore(":memory:"))
    clocks: dict[str, float] = {}

    def timed(name: str, call: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args)
            finally:
                clocks[name] = time.perf_counter() - start
        return wrapper

    host.infer = timed("infer", host.infer)  # type: ignore[method-assign]
    export_call = _boundary.ExportCall.__call__
    _boundary.ExportCall.__call__ = timed("export", export_call)  # type: ignore[method-assign]
    rows = {}
    try:
        with Runtime(cache) as runtime:
            sandbox = FunctionSandbox(runtime, manifest, component_path(fn, manifest), host)
            try:
                for n in BATCHES:
                    parts: dict[str, list[float]] = {k: [] for k in
                                                     ("call", "guest", "model", "infer_crossing", "export_crossing")}
                    before: dict[str, float] = {}
                    for i in range(WARM_CALLS + calls + 1):
                        events = [Event(f"c{i}-{k}", "sensors/bench/digits",
                                        e2e._payload(f"c{i}-{k}", images[(i * n + k) % len(images)], pad), time.time() * 1000)
                                  for k in range(n)]
                        start = time.perf_counter()
                        answers = sandbox.handle_batch(events)
                        took = time.perf_counter() - start
                        doc = json.loads(answers[0][0].payload)  # type: ignore[index]
                        if i > WARM_CALLS:  # the guest's figures are the previous call's: pair them with its
                            parts["call"].append(before["call"])
                            parts["guest"].append(doc["guest_s"] - doc["guest_infer_s"])
                            parts["model"].append(before["infer"])
                            parts["infer_crossing"].append(doc["guest_infer_s"] - before["infer"])
                            parts["export_crossing"].append(before["export"] - doc["guest_s"])
                        before = {"call": took, "infer": clocks["infer"], "export": clocks["export"]}
                    us = {k: round(statistics.median(v) / n * 1e6, 1) for k, v in parts.items()}
                    us["around"] = round(us["call"] - us["guest"] - us["model"] - us["infer_crossing"]
                                         - us["export_crossing"], 1)
                    rows[str(n)] = us
            finally:
                sandbox.close()
    finally:
        _boundary.ExportCall.__call__ = export_call  # type: ignore[method-assign]
    return rows


def _print(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="one sandboxed call of the digits function, µs per event (medians)")
    t.add_column("part")
    for n in doc["batches"]:
        t.add_column(f"batch of {n}", justify="right")
    for key, label in (("call", "the whole call (handle_batch)"), ("guest", "the guest's own Python"),
                       ("model", "host.infer as the host sees it"), ("infer_crossing", "host.infer's crossing"),
                       ("export_crossing", "the export's crossing"), ("around", "the sandbox around the call")):
        t.add_row(label, *(f"{doc['batches'][n][key]:.1f}" for n in doc["batches"]))
    console = Console()
    console.print(t)
    console.print(f"results written to {RESULTS.relative_to(e2e.ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls measured per batch size")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    parser.add_argument("--pad", type=int, default=0, metavar="BYTES", help="filler bytes in each payload (as e2e's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgefn-crossing-") as tmp:
        fn = timed_copy(Path(tmp))
        rows = measure(fn, Path(tmp) / "cache", args.calls, args.pad)
    doc = {"benchmark": "bench/crossing.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "config": {"calls": args.calls, "warm_calls": WARM_CALLS, "pad_bytes": args.pad}, "batches": rows}
    e2e.write_results(RESULTS, doc)
    return e2e.report(doc, args.json_only, _print)


if __name__ == "__main__":
    sys.exit(main())
