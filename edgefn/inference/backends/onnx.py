"""The onnxruntime backend: a model file in ONNX format, on the delegate's execution provider."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgefn.errors import ModelError
from edgefn.inference import delegates
from edgefn.inference.backends.base import agree_inputs, first_line, match_names
from edgefn.inference.delegates import ONNX_CPU, Delegate
from edgefn.inference.model import TensorSpec, check_inputs

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64",
               "tensor(bool)": "bool"}


class OnnxBackend:
    """onnxruntime on the delegate's execution provider (the CPU by default), one thread on the CPU
    (tiny models: threads cost more than they give)."""

    format = "onnx"

    def __init__(self, path: Path, name: str | None = None, inputs: Sequence[TensorSpec] | None = None,
                 outputs: Sequence[str] | None = None, content: bytes | None = None,
                 delegate: Delegate = ONNX_CPU, search: Sequence[Path] = ()):
        ort = delegates.onnxruntime()
        self.name = name or path.stem
        self.delegate = delegate.name
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self._session = delegates.ort_session(content if content is not None else str(path), options, delegate)
        except ModelError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            raise ModelError(f"{path}: onnxruntime cannot load it: {first_line(exc)}") from None
        own = {i.name: TensorSpec(i.name, _ORT_DTYPES.get(i.type, i.type),
                                  tuple(d if isinstance(d, int) else -1 for d in i.shape))
               for i in self._session.get_inputs()}
        names = match_names(path, "inputs", [s.name for s in inputs] if inputs is not None else None, list(own))
        self.inputs = agree_inputs(path, inputs, own, names)
        self.outputs = match_names(path, "outputs", outputs, [o.name for o in self._session.get_outputs()])
        self._input_names = names

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        check_inputs(self.name, self.inputs, inputs)
        try:
            return self._session.run(self.outputs, dict(zip(self._input_names, inputs, strict=True)))
        except Exception as exc:
            raise ModelError(f"model {self.name}: {first_line(exc)}") from None
