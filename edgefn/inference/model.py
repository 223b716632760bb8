"""A model as its folder describes it: model.json's tensor specs and variants, and the inputs a caller gives.

A model folder holds `model.json` and the files of its variants:

    {"name": "digits", "inputs": [{"name", "dtype", "shape"}], "outputs": [...], "dataset", "train", "validation",
     "variants": [{"name": "fp32", "file": "model.onnx", "format": "onnx", "precision": "fp32", "sparsity": 0.0,
                   "accuracy": 0.9144, "size": 21022, "sha256": "...", "made_by": "..."}, ...]}

A variant runs on a backend (`edgefn.inference.backends`); which one runs here is `edgefn.inference.choice`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefn.errors import ModelError


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, dtype name (numpy's) and shape (-1 where any size goes)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, doc: dict) -> TensorSpec:
        return cls(doc["name"], doc["dtype"], tuple(d if isinstance(d, int) and d >= 0 else -1 for d in doc["shape"]))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{self.dtype} [{', '.join('N' if d < 0 else str(d) for d in self.shape)}]"

    @functools.cached_property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def accepts(self, array: np.ndarray) -> bool:  # on every inference: no dtype parsing here
        return (array.dtype == self.np_dtype and array.ndim == len(self.shape)
                and all(want < 0 or want == got for want, got in zip(self.shape, array.shape, strict=True)))


@dataclass(frozen=True)
class Variant:
    """One file of a model: its format, precision and sparsity, and what model.json says about it."""

    name: str
    file: str
    format: str
    precision: str
    sparsity: float = 0.0
    accuracy: float | None = None
    size: int | None = None
    sha256: str | None = None
    made_by: str | None = None

    @classmethod
    def from_json(cls, doc: dict) -> Variant:
        return cls(doc["name"], doc["file"], doc["format"], doc.get("precision", "fp32"),
                   float(doc.get("sparsity") or 0.0), doc.get("accuracy"), doc.get("size"), doc.get("sha256"),
                   doc.get("made_by"))

    def to_json(self) -> dict:
        return {"name": self.name, "file": self.file, "format": self.format, "precision": self.precision,
                "sparsity": self.sparsity, "accuracy": self.accuracy, "size": self.size, "sha256": self.sha256,
                "made_by": self.made_by}


@dataclass(frozen=True)
class ModelInfo:
    """A model folder as its model.json describes it."""

    name: str
    folder: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: tuple[Variant, ...]
    meta: dict

    @classmethod
    def read(cls, folder: Path) -> ModelInfo:
        meta_path = folder / "model.json"
        try:
            meta = json.loads(meta_path.read_text())
            variants = tuple(Variant.from_json(v) for v in meta["variants"])
            if not variants:
                raise ValueError("no variants")
            return cls(meta["name"], folder, tuple(TensorSpec.from_json(i) for i in meta["inputs"]),
                       tuple(TensorSpec.from_json(o) for o in meta["outputs"]), variants, meta)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{meta_path}: unreadable model metadata: {exc!r}") from None

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ModelError(f"model {self.name} has no variant {name!r} (it has: {', '.join(self.variant_names())})")

    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def path(self, variant: Variant) -> Path:
        return self.folder / variant.file


def check_inputs(model: str, specs: Sequence[TensorSpec], inputs: Sequence[np.ndarray]) -> None:
    """A clear error for what a caller got wrong, before the runtime gives an obscure one."""
    if len(inputs) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise ModelError(f"model {model} takes {len(specs)} input(s) ({names}), got {len(inputs)}")
    for spec, array in zip(specs, inputs, strict=True):
        if not spec.accepts(array):
            raise ModelError(f"model {model}: input {spec.name!r} must be {spec.describe()}, "
                             f"got {array.dtype} [{', '.join(str(d) for d in array.shape)}]")
