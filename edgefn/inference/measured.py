"""Latencies measured on this device (`edgefn model bench`), kept in the state dir, read when a model's
variant is chosen: where they are recorded, the fastest variant here runs, not the one a precision
order guesses (on a small model and this CPU, int8 ONNX was the slowest of six).

One JSON file, `<state dir>/latency.json`: model -> variant -> {sha256, median_ms} at batch 1. A record
counts only while the variant's file is the one measured (its sha256 in model.json).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from edgefn.files import write_atomic
from edgefn.inference.model import ModelInfo

LATENCY_FILE = "latency.json"


def _read(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return {}  # none recorded yet (or unreadable: the precision order decides, as before)
    return doc if isinstance(doc, dict) else {}


def recorded(path: Path, info: ModelInfo) -> dict[str, float]:
    """Variant -> median ms at batch 1, as measured here, for the variants whose file is unchanged."""
    found: dict[str, float] = {}
    for name, row in (_read(path).get(info.name) or {}).items():
        variant = next((v for v in info.variants if v.name == name), None)
        if variant is not None and isinstance(row, dict) and row.get("sha256") == variant.sha256:
            try:
                found[name] = float(row["median_ms"])
            except (KeyError, TypeError, ValueError):
                continue
    return found


def record(path: Path, info: ModelInfo, medians: Mapping[str, float]) -> None:
    """Keep the medians measured now for `info`'s variants (the others' records stay)."""
    doc = _read(path)
    rows = doc.setdefault(info.name, {})
    for variant in info.variants:
        if variant.name in medians:
            rows[variant.name] = {"sha256": variant.sha256, "median_ms": medians[variant.name]}
    write_atomic(Path(path), json.dumps(doc, indent=1, sort_keys=True).encode())
