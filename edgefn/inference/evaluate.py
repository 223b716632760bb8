"""How good and how fast a loaded model is: accuracy on labelled samples, latency per call.

Samples come as `.npz` files with two arrays: `x`, the model's input (one row per sample), and
`y`, the true labels (integers). A model's predicted label is its int64 [N] output named `label`
where it has one, else the argmax of its first float output (class scores or probabilities).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefn.errors import ModelError
from edgefn.inference.backends.base import Backend


@dataclass(frozen=True)
class Samples:
    """Inputs `x` and, where known, their labels `y`."""

    x: np.ndarray
    y: np.ndarray | None

    @classmethod
    def load(cls, path: Path, labels: bool = True) -> Samples:
        try:
            with np.load(path, allow_pickle=False) as data:
                x = data["x"]
                y = data["y"] if "y" in data.files else None
        except FileNotFoundError:
            raise ModelError(f"{path}: file missing") from None
        except KeyError:
            raise ModelError(f"{path}: no array 'x' (an .npz needs 'x', the inputs, and 'y', the labels)") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable .npz file ({exc})") from None
        if labels and y is None:
            raise ModelError(f"{path}: no array 'y' (the labels of the rows of 'x')")
        if y is not None and (y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu"):
            raise ModelError(f"{path}: 'y' must be one integer label per row of 'x' "
                             f"(x has {len(x)} rows, y is {y.dtype} {list(y.shape)})")
        if len(x) == 0:
            raise ModelError(f"{path}: 'x' has no rows")
        return cls(x, y)

    def inputs_for(self, backend: Backend) -> np.ndarray:
        """`x` in the dtype the model takes (npz files often hold float64 or uint8 pixels)."""
        if len(backend.inputs) != 1:
            raise ModelError(f"model {backend.name} takes {len(backend.inputs)} inputs; "
                             "samples in an .npz give one ('x')")
        return np.ascontiguousarray(self.x, dtype=np.dtype(backend.inputs[0].dtype))


def predicted_labels(outputs: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The label per row: the `label` output (int64 [N]) if there is one, else argmax of the first float output."""
    for name, out in zip(names, outputs, strict=True):
        if name == "label" and out.ndim == 1 and out.dtype.kind in "iu":
            return out
    for out in outputs:
        if out.dtype.kind == "f" and out.ndim >= 1:
            return out.reshape(len(out), -1).argmax(axis=1) if out.ndim > 1 else (out > 0.5).astype(np.int64)
    raise ModelError("the model has neither an integer 'label' output nor a float output to take the argmax of")


def predict(backend: Backend, samples: Samples, batch: int = 256) -> np.ndarray:
    x = samples.inputs_for(backend)
    return np.concatenate([predicted_labels(backend.run([x[i:i + batch]]), backend.outputs)
                           for i in range(0, len(x), batch)])


def accuracy(backend: Backend, samples: Samples) -> float:
    """The fraction of samples whose predicted label is the true one."""
    if samples.y is None:
        raise ModelError("accuracy needs labelled samples ('y')")
    return float((predict(backend, samples) == samples.y).mean())


@dataclass(frozen=True)
class Latency:
    """Wall time of one `run` call on a batch, over `runs` calls after a warm-up."""

    batch: int
    median_ms: float
    p99_ms: float
    runs: int

    def to_json(self) -> dict:
        return {"batch": self.batch, "median_ms": self.median_ms, "p99_ms": self.p99_ms, "runs": self.runs}


def measure_latency(backend: Backend, samples: Samples, batch: int, *, min_runs: int = 50, max_runs: int = 2000,
                    budget_s: float = 0.5, warmup: int = 20) -> Latency:
    """Median and p99 of `run` on `batch` rows (repeated from the samples if they are fewer): at least
    `min_runs` calls, more while `budget_s` lasts, at most `max_runs`."""
    x = samples.inputs_for(backend)
    rows = np.resize(x, (batch, *x.shape[1:])) if len(x) < batch else x[:batch]
    inputs = [np.ascontiguousarray(rows)]
    for _ in range(warmup):
        backend.run(inputs)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        backend.run(inputs)
        times.append(time.perf_counter() - t0)
    times.sort()
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    return Latency(batch, statistics.median(times) * 1000, p99 * 1000, len(times))
