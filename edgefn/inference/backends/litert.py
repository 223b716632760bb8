"""The LiteRT backend: a .tflite file through its signature, one interpreter per thread.

LiteRT is imported on the first use of a .tflite variant only (ai-edge-litert, else tflite-runtime).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgefn.errors import ModelError
from edgefn.inference import delegates
from edgefn.inference.backends.base import agree_inputs, first_line, match_names
from edgefn.inference.delegates import XNNPACK, Delegate
from edgefn.inference.model import TensorSpec, check_inputs


def litert_interpreter() -> type:
    """LiteRT's Interpreter class: ai-edge-litert, else tflite-runtime where only it is installed."""
    return litert_module().Interpreter


def litert_module() -> ModuleType:
    """LiteRT's interpreter module (Interpreter, load_delegate): ai-edge-litert, else tflite-runtime."""
    try:
        module = importlib.import_module("ai_edge_litert.interpreter")
    except ImportError:
        pass
    else:
        return module
    try:
        module = importlib.import_module("tflite_runtime.interpreter")

        _ = module.Interpreter  # its native part may fail only now (tflite-runtime 2.14 under numpy 2)
    except ModuleNotFoundError:
        raise ModelError("LiteRT is not installed (pip install ai-edge-litert)") from None
    except Exception as exc:  # tflite-runtime 2.14 under numpy 2: "numpy.core.multiarray failed to import"
        raise ModelError(f"tflite-runtime cannot be imported ({first_line(exc)}); "
                         "install ai-edge-litert, its maintained successor") from None
    return module


class LiteRtBackend:
    """LiteRT through the file's signature, so outputs map by name and the batch size can change per call.

    An interpreter is not reentrant: each thread gets its own (cheap for edge-sized models; Invoke lets go
    of the GIL, so threads run in parallel instead of queueing on a lock)."""

    format = "tflite"

    def __init__(self, path: Path, name: str | None = None, inputs: Sequence[TensorSpec] | None = None,
                 outputs: Sequence[str] | None = None, content: bytes | None = None,
                 delegate: Delegate = XNNPACK, search: Sequence[Path] = ()):
        self.name = name or path.stem
        self.delegate = delegate.name
        self._path = path
        module = litert_module()
        self._interpreter_class = module.Interpreter
        load_delegate = getattr(module, "load_delegate", None)
        # Each thread's interpreter gets its own instance of the delegate.
        self._delegate_options = lambda: delegates.litert_options(delegate, search, load_delegate)
        try:
            self._content = content if content is not None else path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read it: {exc.strerror}") from None
        self._local = threading.local()
        runner = self._runner()  # the first interpreter, now: a bad file fails the load, not an event
        own = {n: TensorSpec(n, np.dtype(d["dtype"]).name, tuple(int(s) for s in d["shape_signature"]))
               for n, d in runner.get_input_details().items()}
        names = match_names(path, "inputs", [s.name for s in inputs] if inputs is not None else None, list(own))
        # The runner resizes every input to the array given, so the batch dimension is free even where
        # the converter wrote a fixed one.
        free = {n: TensorSpec(n, s.dtype, (-1, *s.shape[1:])) for n, s in own.items()}
        self.inputs = agree_inputs(path, inputs, free, names)
        self.outputs = match_names(path, "outputs", outputs, list(runner.get_output_details()))

    def _runner(self) -> Any:
        runner = getattr(self._local, "runner", None)
        if runner is None:
            options = self._delegate_options()  # a delegate that does not load is a ModelError of its own
            try:
                interpreter = self._interpreter_class(model_content=self._content, num_threads=1, **options)
                keys = list(interpreter.get_signature_list())
                if not keys:
                    raise ValueError("the file has no signature (convert it from a SavedModel with one)")
                runner = interpreter.get_signature_runner("serving_default" if "serving_default" in keys else keys[0])
            except Exception as exc:  # LiteRT raises ValueError/RuntimeError with the flatbuffer's complaint
                raise ModelError(f"{self._path}: LiteRT cannot load it: {first_line(exc)}") from None
            self._local.runner = runner
        return runner

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        check_inputs(self.name, self.inputs, inputs)
        try:
            result = self._runner()(**{s.name: a for s, a in zip(self.inputs, inputs, strict=True)})
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {self.name}: {first_line(exc)}") from None
        return [result[n] for n in self.outputs]
