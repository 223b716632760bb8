"""Models by name: find `<models dir>/<name>/model.json`, load the file it names, run it.

A model folder holds `model.json` (name, inputs, outputs, and `variants`: each a file with its
format, precision, sparsity, accuracy, size and sha256) and the model files. Sessions are loaded on first use and shared by every function and thread.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgefn.errors import ModelError
from edgefn.inference.tensors import WireTensor, from_wire, to_wire


class Backend(Protocol):
    """A loaded model that runs on this device."""

    name: str
    delegate: str

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    format: str
    sha256: str
    meta: dict

    @classmethod
    def read(cls, folder: Path) -> ModelInfo:
        meta_path = folder / "model.json"
        try:
            meta = json.loads(meta_path.read_text())
            variant = meta["variants"][0]
            return cls(meta["name"], folder / variant["file"], variant["format"], variant["sha256"], meta)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise ModelError(f"{meta_path}: unreadable model metadata: {exc}") from None


class OnnxBackend:
    """onnxruntime on the CPU execution provider."""

    delegate = "cpu"

    def __init__(self, info: ModelInfo):
        import onnxruntime as ort

        self.name = info.name
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # tiny models: threads cost more than they give
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(info.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelError(f"{info.path}: onnxruntime cannot load it: {exc}") from None
        self._inputs = [i.name for i in self._session.get_inputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._inputs):
            raise ModelError(f"model {self.name} takes {len(self._inputs)} inputs, got {len(inputs)}")
        try:
            return self._session.run(None, dict(zip(self._inputs, inputs, strict=True)))
        except Exception as exc:
            raise ModelError(f"model {self.name}: {exc}") from None


class ModelRegistry:
    """Every model under the given folders, loaded on first use."""

    def __init__(self, folders: Sequence[Path], verify: bool = True):
        self._infos: dict[str, ModelInfo] = {}
        for folder in folders:
            for meta in sorted(Path(folder).glob("*/model.json")):
                info = ModelInfo.read(meta.parent)
                self._infos.setdefault(info.name, info)
        self._loaded: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._verify = verify

    def names(self) -> list[str]:
        return sorted(self._infos)

    def get(self, name: str) -> Backend:
        backend = self._loaded.get(name)
        if backend is not None:
            return backend
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(name)
            return self._loaded[name]

    def _load(self, name: str) -> Backend:
        info = self._infos.get(name)
        if info is None:
            known = ", ".join(self.names()) or "none"
            raise ModelError(f"no model named {name!r} (known: {known})")
        if not info.path.exists():
            raise ModelError(f"{info.path}: model file missing")
        if self._verify and hashlib.sha256(info.path.read_bytes()).hexdigest() != info.sha256:
            raise ModelError(f"{info.path}: sha256 does not match model.json")
        if info.format != "onnx":
            raise ModelError(f"model {name}: format {info.format!r} is not supported yet")
        return OnnxBackend(info)

    def infer(self, name: str, inputs: list[WireTensor]) -> list[WireTensor]:
        backend = self.get(name)
        return [to_wire(out) for out in backend.run([from_wire(t) for t in inputs])]
