"""Variants of a float ONNX model, made here and kept only while they stay accurate.

- `int8`: static quantization by onnxruntime (QDQ format, MinMax), calibrated on sample inputs.
  Per-channel and per-tensor weight scales are both tried, and the one whose labels agree more often
  with the model it quantizes, on the validation inputs, is kept (per-channel helps where the
  output channels of a weight differ in range; per-tensor is smaller, and wins ties).
- `pruned<NN>`: magnitude pruning, NN % of the weights of the MatMul, Gemm and Conv nodes set to
  zero, the smallest |w| first. Biases, scaler constants and the rest are left alone. By default
  one threshold serves all those weights (`global`): a layer with many redundant weights (a big
  middle convolution) loses more of them than a small, critical one (the first convolution, the
  classifier). Measured at 50 %: digits 0.9169 (global) vs 0.9068 (each layer to 50 %, `layer`),
  digits-cnn 0.9798 vs 0.9446, against 0.9144 and 0.9748 unpruned. There is no fine-tuning, so
  high sparsities lose accuracy. The file is as large as the dense one: zeros are still stored,
  and only a compressed download gets smaller (the gzip size is reported).
- `pruned<NN>-int8`: pruned, then quantized.

Each variant is evaluated on the validation samples and timed (batch 1 and 16, one thread). A
variant whose accuracy falls more than `max_drop` below the float model's is refused: its file is
not kept and model.json does not name it. The rest are written beside model.json and merged into
it by name.

Needs the `onnx` package (`pip install 'edgefn[models]'`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefn.errors import ModelError
from edgefn.inference.backends.onnx import OnnxBackend
from edgefn.inference.evaluate import Latency, Samples, accuracy, measure_latency, predict
from edgefn.inference.model import TensorSpec, Variant

MADE_BY = "edgefn model optimize"
QUANTIZATIONS = ("int8",)
# The weight operands of these ops are pruned (by input position); nothing else is.
_WEIGHT_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,)}
PRUNE_SCOPES = ("global", "layer")
_LATENCY_BATCHES = (1, 16)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ModelError("making variants needs the onnx package: pip install 'edgefn[models]'") from None
    return onnx


@dataclass(frozen=True)
class Planned:
    """A variant to make: its name, the sparsity to prune to (0: none), and whether to quantize."""

    name: str
    sparsity: float
    quantize: bool

    @property
    def precision(self) -> str:
        return "int8" if self.quantize else "fp32"

    def describe(self, calibration_samples: int) -> str:
        doing = [f"pruning to {self.sparsity:.0%}"] if self.sparsity else []
        if self.quantize:
            doing.append(f"quantizing (calibrating on {calibration_samples} samples)")
        return " and ".join(doing)


def plan(quantize: str | None, prune: float | None) -> list[Planned]:
    """The variants asked for: int8, pruned<NN>, and with both, pruned<NN>-int8 as well."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantize!r} (known: {', '.join(QUANTIZATIONS)})")
    if prune is not None and not 0 < prune < 1:
        raise ModelError(f"--prune is the fraction of weights to zero, between 0 and 1 (got {prune})")
    planned = [Planned("int8", 0.0, True)] if quantize else []
    if prune:
        pruned = f"pruned{round(prune * 100)}"
        planned.append(Planned(pruned, prune, False))
        if quantize:
            planned.append(Planned(f"{pruned}-int8", prune, True))
    if not planned:
        raise ModelError("nothing to make: ask for --quantize int8, --prune FRACTION or both")
    return planned


@dataclass
class Outcome:
    """One variant as made and measured, and whether it was registered (and if not, why)."""

    variant: str
    file: str
    precision: str
    sparsity: float
    accuracy: float
    drop: float  # the float model's accuracy minus this one's
    size: int
    gzip_size: int
    latency: list[Latency]
    registered: bool
    note: str  # how it was made, or why it was refused

    def to_json(self) -> dict:
        return {"variant": self.variant, "file": self.file, "precision": self.precision, "sparsity": self.sparsity,
                "accuracy": self.accuracy, "drop": self.drop, "size": self.size, "gzip_size": self.gzip_size,
                "latency": [lat.to_json() for lat in self.latency], "registered": self.registered, "note": self.note}


def steps(planned: list[Planned]) -> int:
    """How many times `optimize` calls its `progress` callback for this plan."""
    return 1 + 2 * len(planned)


def _check_scope(scope: str) -> None:
    if scope not in PRUNE_SCOPES:
        raise ModelError(f"unknown pruning scope {scope!r} (known: {', '.join(PRUNE_SCOPES)})")


def prune(model: Any, sparsity: float, scope: str = "global") -> int:
    """Zero the `sparsity` fraction of smallest-|w| entries of the MatMul/Gemm/Conv weights, in place:
    of all of them together (`global`) or of each tensor (`layer`). Returns how many tensors it pruned."""
    from onnx import numpy_helper

    _check_scope(scope)
    initializers = {t.name: t for t in model.graph.initializer}
    names = sorted({node.input[i] for node in model.graph.node for i in _WEIGHT_INPUTS.get(node.op_type, ())
                    if i < len(node.input) and node.input[i] in initializers})
    weights = {n: numpy_helper.to_array(initializers[n]) for n in names}
    # A bias or a scalar is not a weight matrix, whatever input it feeds.
    weights = {n: w for n, w in weights.items() if w.dtype.kind == "f" and w.ndim >= 2}
    if not weights:
        raise ModelError("the model has no MatMul/Gemm/Conv weights stored in it to prune")
    for group in ([list(weights)] if scope == "global" else [[n] for n in weights]):
        flat = np.concatenate([weights[n].astype(np.float32).reshape(-1) for n in group])
        k = round(sparsity * flat.size)
        if k:
            flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
        ends = np.cumsum([weights[n].size for n in group])
        for n, part in zip(group, np.split(flat, ends[:-1]), strict=True):
            zeroed = part.reshape(weights[n].shape).astype(weights[n].dtype)
            initializers[n].CopyFrom(numpy_helper.from_array(zeroed, n))
    return len(weights)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantization tools log advice at WARNING through the root logger; keep it off the screen."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_int8(model: bytes, calibration: Samples, check: Samples, workdir: Path) -> tuple[bytes, str]:
    """Static int8 quantization (QDQ) of `model`, calibrated on `calibration`; of the ways tried, the one
    whose labels on the inputs of `check` agree most with `model`'s. Returns the bytes and how they were made."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The calibration samples, 32 rows at a time."""

        def __init__(self, input_name: str, x: np.ndarray):
            self._batches = iter([{input_name: x[i:i + 32]} for i in range(0, len(x), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    raw = workdir / "float.onnx"
    raw.write_bytes(model)
    probe = OnnxBackend(raw)
    x = calibration.inputs_for(probe)
    # The model's own answers are what its quantized copy should reproduce (the true labels are not used).
    answers = Samples(check.x, predict(probe, check))
    sources = [raw]
    with _quiet():
        try:  # onnxruntime's advice: shape inference and graph optimisation before quantizing
            quant_pre_process(str(raw), str(workdir / "pre.onnx"), skip_symbolic_shape=True)
            sources.insert(0, workdir / "pre.onnx")
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; the raw model still quantizes
            pass
        made: list[tuple[float, int, bytes, str]] = []
        for per_channel in (False, True):
            for source in sources:
                dest = workdir / f"int8-{per_channel}.onnx"
                try:
                    quantize_static(str(source), str(dest), Reader(probe.inputs[0].name, x),
                                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
                except Exception:  # noqa: BLE001 - e.g. a pre-processed graph it cannot quantize: try the next
                    continue
                how = ("per-channel" if per_channel else "per-tensor") + (", pre-processed" if source != raw else "")
                made.append((accuracy(OnnxBackend(dest), answers), -per_channel, dest.read_bytes(), how))
                break
    if not made:
        raise ModelError("onnxruntime could not quantize this model")
    _, _, content, how = max(made, key=lambda m: (m[0], m[1]))  # ties: per-tensor, the smaller file
    return content, f"{how}, calibrated on {len(x)} samples"


def _write_atomically(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _spec_of(value_info: Any) -> dict:
    from onnx import helper

    tensor = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return TensorSpec(value_info.name, helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, tuple(dims)).to_json()


def _new_meta(folder: Path, model: Any) -> dict:
    """model.json for a folder that has none yet: named after the folder, tensors as the graph declares them."""
    initializers = {t.name for t in model.graph.initializer}
    return {"name": folder.name, "inputs": [_spec_of(i) for i in model.graph.input if i.name not in initializers],
            "outputs": [_spec_of(o) for o in model.graph.output], "variants": []}


def register(folder: Path, entries: list[dict], meta: dict | None = None) -> None:
    """Merge variant entries into `folder/model.json` by name (replaced in place, or appended).

    Read just before writing: other tools add their own variants to the same file."""
    path = folder / "model.json"
    current = json.loads(path.read_text()) if path.exists() else dict(meta or {})
    variants = current.setdefault("variants", [])
    for entry in entries:
        at = next((i for i, v in enumerate(variants) if v["name"] == entry["name"]), None)
        if at is None:
            variants.append(entry)
        else:
            variants[at] = entry
    _write_atomically(path, (json.dumps(current, indent=2) + "\n").encode())


def _entry(name: str, file: str, content: bytes, precision: str, sparsity: float, acc: float) -> dict:
    return Variant(name, file, "onnx", precision, sparsity, round(acc, 4), len(content),
                   hashlib.sha256(content).hexdigest(), MADE_BY).to_json()


class _Bench:
    """Evaluates and times candidate ONNX files against the validation samples."""

    def __init__(self, validation: Samples, outputs: list[str] | None, workdir: Path):
        self.validation, self.outputs, self.workdir = validation, outputs, workdir

    def measure(self, name: str, content: bytes) -> tuple[float, list[Latency], OnnxBackend]:
        path = self.workdir / f"{name}.onnx"
        path.write_bytes(content)
        backend = OnnxBackend(path, name, outputs=self.outputs)
        return accuracy(backend, self.validation), [measure_latency(backend, self.validation, b)
                                                    for b in _LATENCY_BATCHES], backend


def optimize(src: Path, calibration: Samples | None, validation: Samples, *, quantize: str | None = "int8",
             prune_to: float | None = None, prune_scope: str = "global", max_drop: float = 0.01,
             out: Path | None = None,
             progress: Callable[[str], None] = lambda _step: None) -> list[Outcome]:
    """Make the variants asked for from the float ONNX model `src` into `out` (default: its folder).

    Returns the float model's outcome first (the baseline), then one per variant asked for.
    `progress(description)` is called at the start of each of `steps(plan(...))` steps."""
    onnx = _onnx()
    planned = plan(quantize, prune_to)
    _check_scope(prune_scope)
    if calibration is None and any(p.quantize for p in planned):
        raise ModelError("quantizing needs calibration samples (--calibration DATA.npz)")
    if max_drop < 0:
        raise ModelError(f"--max-drop must be 0 or more (got {max_drop})")
    out = out or src.parent
    try:
        float_bytes = src.read_bytes()
        model = onnx.load_from_string(float_bytes)
    except FileNotFoundError:
        raise ModelError(f"{src}: file missing") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelError(f"{src}: not an ONNX model ({exc})") from None
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((out / "model.json").read_text()) if (out / "model.json").exists() else _new_meta(out, model)
    outputs = [o["name"] for o in meta["outputs"]] or None

    with tempfile.TemporaryDirectory(prefix="edgefn-optimize-") as tmp:
        bench = _Bench(validation, outputs, Path(tmp))
        progress(f"measuring the float model {src.name}")
        base_acc, base_lat, base = bench.measure("float", float_bytes)
        if calibration is not None:
            predict(base, calibration)  # the calibration samples fit the model: fail now, not after minutes
        outcomes = [Outcome("fp32", src.name, "fp32", 0.0, base_acc, 0.0, len(float_bytes),
                            len(gzip.compress(float_bytes)), base_lat, True, "the float model (baseline)")]
        if not (out / "model.json").exists():
            if not (out / src.name).exists():
                _write_atomically(out / src.name, float_bytes)
            register(out, [_entry("fp32", src.name, float_bytes, "fp32", 0.0, base_acc)], meta)
        for p in planned:
            progress(f"{p.name}: {p.describe(len(calibration.x) if calibration is not None else 0)}")
            content, note = _make(onnx, float_bytes, p, prune_scope, calibration, validation, Path(tmp))
            progress(f"{p.name}: evaluating on {len(validation.x)} samples and timing")
            acc, lat, _ = bench.measure(p.name, content)
            outcome = Outcome(p.name, f"{src.stem}.{p.name}.onnx", p.precision, p.sparsity, acc, base_acc - acc,
                              len(content), len(gzip.compress(content)), lat, False, note)
            if outcome.drop > max_drop + 1e-9:
                outcome.note = (f"accuracy {acc:.4f} is {outcome.drop * 100:.2f} points below the float "
                                f"model's {base_acc:.4f} (--max-drop {max_drop:g})")
            else:
                _write_atomically(out / outcome.file, content)
                register(out, [_entry(p.name, outcome.file, content, p.precision, p.sparsity, acc)])
                outcome.registered = True
            outcomes.append(outcome)
    return outcomes


def _make(onnx: Any, float_bytes: bytes, p: Planned, scope: str, calibration: Samples | None, check: Samples,
          workdir: Path) -> tuple[bytes, str]:
    """The bytes of one planned variant, and how they were made."""
    content, notes = float_bytes, []
    if p.sparsity:
        model = onnx.load_from_string(float_bytes)
        count = prune(model, p.sparsity, scope)
        notes.append(f"{p.sparsity:.0%} of the weights of {count} tensors zeroed"
                     + (" (one threshold for all)" if scope == "global" else " (each tensor alike)"))
        content = model.SerializeToString()
    if p.quantize and calibration is not None:
        content, how = quantize_int8(content, calibration, check, workdir)
        notes.append(how)
    return content, "; ".join(notes)
