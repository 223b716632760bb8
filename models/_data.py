"""Shared by the model build scripts: the digits data split, the sample .npz files, and model.json variants.

Every model in this folder is trained on scikit-learn's 8x8 digits images 0..1399 and validated on
images 1400..1796, with raw pixel values 0..16 as float32 [N, 64]. Each model folder gets:

- `calibration.npz`: arrays `x` (float32 [200, 64], a fixed seeded sample of the training images) and
  `y` (int64 [200], their labels), for tools that calibrate quantization (int8 ONNX, int8 TFLite);
- `validation.npz`: arrays `x` (float32 [397, 64], images 1400..1796) and `y` (int64 [397]),
  on which every variant's accuracy in model.json is measured.

Needs only numpy and scikit-learn. Build scripts import it as `_data` after putting this folder on sys.path,
so that each stays runnable as `python models/<name>/build*.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

TRAIN = 1400  # images 0..1399 train, 1400..1796 validate
CALIBRATION_SIZE = 200
CALIBRATION_SEED = 0


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): x float32 [N, 64] raw 0..16, y int64 [N]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int64)
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def calibration_sample(x_train: np.ndarray, y_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fixed seeded sample of the training images: the same 200 on every machine and every run."""
    rows = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(x_train), CALIBRATION_SIZE, replace=False))
    return x_train[rows], y_train[rows]


def write_samples(out: Path) -> None:
    """Write `calibration.npz` and `validation.npz` (arrays `x` inputs, `y` labels) into `out`."""
    x_train, y_train, x_val, y_val = load_digits_split()
    x_cal, y_cal = calibration_sample(x_train, y_train)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "calibration.npz", x=x_cal, y=y_cal)
    np.savez_compressed(out / "validation.npz", x=x_val, y=y_val)


def variant(name: str, path: Path, fmt: str, precision: str, accuracy: float, made_by: str) -> dict:
    """A model.json variant entry for the file at `path` (size and sha256 of its bytes as written)."""
    raw = path.read_bytes()
    return {
        "name": name, "file": path.name, "format": fmt, "precision": precision, "sparsity": 0.0,
        "accuracy": round(float(accuracy), 4), "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
        "made_by": made_by,
    }


def merge_variants(meta_path: Path, variants: list[dict], meta: dict | None = None) -> dict:
    """Replace (by name, in place) or append `variants` in model.json, keeping every other entry.

    With `meta`, its top-level fields replace the file's (a full rebuild); the existing variants are still kept.
    Read just before writing: other tools add their own variants to the same file.
    """
    current = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    merged = dict(meta if meta is not None else current)
    entries = list(meta.get("variants", []) if meta is not None else [])
    names = {v["name"] for v in entries}
    entries += [v for v in current.get("variants", []) if v["name"] not in names]
    for new in variants:
        at = next((i for i, v in enumerate(entries) if v["name"] == new["name"]), None)
        if at is None:
            entries.append(new)
        else:
            entries[at] = new
    merged["variants"] = entries
    meta_path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged
