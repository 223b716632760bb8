"""Model variants benchmark: every variant of every model under models/, against that model's fp32 ONNX.

For each model folder (model.json) and each variant it lists, in one run and one process:

  size      the file's bytes (and gzip's, since pruned files only shrink when compressed);
  accuracy  on the folder's validation.npz (arrays `x`, `y`), the predicted label being the `label`
            output, else the argmax of the first float output;
  latency   of one `run` call at batch 1 and batch 16 on the variant's own backend (onnxruntime for
            ONNX, LiteRT for TFLite; CPU, one thread): median and p99 over at least 200 calls after a
            warm-up, at most 1 s per figure;

and the ratios of size and median latency to the model's `fp32` ONNX variant (the baseline: what
the model is before any optimisation). A variant that cannot run here is listed with the reason.
Variants are timed one after another, never at once. The script exits 0 whatever the figures;
non-zero only when something failed to run (a model without validation.npz or without an fp32 variant
that runs). Results also go to bench/results/models.json.

    .venv/bin/python bench/models.py [--models DIR] [--json-only]

Takes a few seconds per variant.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "models.json"
BASELINE = "fp32"
BATCHES = (1, 16)
MIN_RUNS = 200
BUDGET_S = 1.0


class BenchError(Exception):
    pass


def _measure(info: Any, variant: Any, samples: Any) -> dict[str, Any]:
    from edgefn.errors import ModelError
    from edgefn.inference.backends import open_variant
    from edgefn.inference.evaluate import accuracy, measure_latency

    raw = info.path(variant).read_bytes() if info.path(variant).is_file() else b""
    row: dict[str, Any] = {"variant": variant.name, "file": variant.file, "format": variant.format,
                           "precision": variant.precision, "sparsity": variant.sparsity, "size": len(raw),
                           "gzip_size": len(gzip.compress(raw))}
    try:
        backend = open_variant(info, variant)
    except ModelError as exc:
        return {**row, "skipped": str(exc)}
    row["backend"] = {"onnx": "onnxruntime", "tflite": "LiteRT"}.get(variant.format, variant.format)
    row["accuracy"] = accuracy(backend, samples)
    row["recorded_accuracy"] = variant.accuracy
    row["latency"] = [measure_latency(backend, samples, b, min_runs=MIN_RUNS, max_runs=20_000,
                                      budget_s=BUDGET_S).to_json() for b in BATCHES]
    return row


def _with_ratios(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    base = next((r for r in rows if r["variant"] == BASELINE and "latency" in r), None)
    if base is None:
        raise BenchError(f"model {model}: no {BASELINE} variant that runs here, to compare against")
    for row in rows:
        if "latency" in row:
            row["size_ratio"] = row["size"] / base["size"]
            row["latency_ratio"] = {str(lat["batch"]): lat["median_ms"] / b["median_ms"]
                                    for lat, b in zip(row["latency"], base["latency"], strict=True)}
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgefn.inference.evaluate import Samples
    from edgefn.inference.model import ModelInfo

    folders = sorted(meta.parent for meta in args.models.glob("*/model.json"))
    if not folders:
        raise BenchError(f"no model folders (with model.json) under {args.models}")
    models = []
    for folder in folders:
        info = ModelInfo.read(folder)
        if not (folder / "validation.npz").is_file():
            raise BenchError(f"{folder}: no validation.npz to measure accuracy on")
        samples = Samples.load(folder / "validation.npz")
        if not args.json_only:
            print(f"models: {info.name}: {len(info.variants)} variants", file=sys.stderr)
        rows = [_measure(info, v, samples) for v in info.variants]
        models.append({"model": info.name, "folder": str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT)
                                                          else folder),
                       "validation_samples": len(samples.x), "variants": _with_ratios(rows, info.name)})

    import numpy
    import onnxruntime

    try:
        import ai_edge_litert

        litert = getattr(ai_edge_litert, "__version__", "installed")
    except ImportError:
        litert = None
    doc = {
        "benchmark": "bench/models.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"batches": list(BATCHES), "min_runs": MIN_RUNS, "budget_s": BUDGET_S, "threads": 1,
                   "baseline": f"{BASELINE} (ONNX, onnxruntime)"},
        "env": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__, "ai_edge_litert": litert},
        "models": models,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _print_table(doc: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from edgefn.cli._toolkit import format_ms, format_size

    console = Console()
    for model in doc["models"]:
        t = Table(title=f"{model['model']}: {model['validation_samples']} validation samples, "
                        f"ratios against {BASELINE} ONNX", box=box.SIMPLE, pad_edge=False, collapse_padding=True)
        for column in ("variant", "size", "gzip", "acc", "b1", "b16", "size", "b1", "b16"):
            t.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
        for row in model["variants"]:
            if "skipped" in row:
                t.add_row(row["variant"], f"[yellow]cannot run here: {row['skipped']}[/]")
                continue
            lat = row["latency"]
            t.add_row(row["variant"], format_size(row["size"]), format_size(row["gzip_size"]),
                      f"{row['accuracy']:.4f}", *(format_ms(x["median_ms"]) for x in lat),
                      f"{row['size_ratio']:.2f}x", *(f"{row['latency_ratio'][str(b)]:.2f}x" for b in BATCHES))
        console.print(t)
    console.print("b1, b16: median latency of one call at batch 1, 16 (one thread; LiteRT for tflite files, "
                  "onnxruntime for onnx); acc: accuracy; then size, b1 and b16 as ratios (x) to the baseline")
    console.print(f"results written to {RESULTS.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="folder of model folders")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    try:
        doc = run(args)
    except BenchError as exc:  # a bug shows its traceback; a model that cannot be measured, one line
        print(f"models: failed: {exc}", file=sys.stderr)
        return 1
    if args.json_only:
        print(json.dumps(doc, indent=2))
    else:
        _print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
