"""The backends, one small class per runtime behind `base.Backend`, by the variant format they run;
`open_variant` loads a variant of a model on one of them.

    onnx.py     OnnxBackend: onnxruntime, on the delegate's execution provider
    litert.py   LiteRtBackend: LiteRT (imported on first use), one interpreter per thread
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from edgefn.errors import ModelError
from edgefn.inference.backends.base import Backend
from edgefn.inference.backends.litert import LiteRtBackend
from edgefn.inference.backends.onnx import OnnxBackend
from edgefn.inference.delegates import DEFAULT_CHAINS, Delegate
from edgefn.inference.model import ModelInfo, Variant

BACKENDS: dict[str, type] = {"onnx": OnnxBackend, "tflite": LiteRtBackend}


def open_variant(info: ModelInfo, variant: Variant, verify: bool = True, delegate: Delegate | None = None,
                 search: Sequence[Path] = (), content: bytes | None = None) -> Backend:
    """Load one variant of a model on a delegate (its format's first default one if none), or say in a
    ModelError why it cannot run here. `content`: the file's bytes, read and checked already."""
    backend = BACKENDS.get(variant.format)
    if backend is None:
        raise ModelError(f"format {variant.format!r} has no backend here (known: {', '.join(BACKENDS)})")
    if content is None:
        content = read_variant(info, variant, verify)
    delegate = delegate or DEFAULT_CHAINS[variant.format][0]
    return backend(info.path(variant), info.name, info.inputs, [o.name for o in info.outputs], content, delegate,
                   search)


def read_variant(info: ModelInfo, variant: Variant, verify: bool = True) -> bytes:
    """A variant's file, checked against the sha256 model.json records; a ModelError says what is wrong."""
    path = info.path(variant)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: file missing") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it: {exc.strerror}") from None
    if verify and hashlib.sha256(content).hexdigest() != variant.sha256:
        raise ModelError(f"{path}: sha256 does not match model.json (truncated or changed since it was recorded)")
    return content
