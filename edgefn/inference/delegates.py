"""Delegates: where a backend runs a model (an NPU, a GPU, the CPU), tried in the device profile's order.

A delegate that is missing here (an execution provider this onnxruntime build lacks, a delegate
library that is not installed) or that fails to initialise is passed over with the reason; the
registry then tries the next one. The mechanisms are the runtimes' own:

- onnxruntime: an execution provider, asked for ahead of the CPU provider (which takes the nodes the
  accelerator cannot). onnxruntime falls back to the CPU quietly when a provider fails to start
  (missing CUDA or TensorRT libraries), so the session's providers are checked afterwards.
- LiteRT: an external delegate library loaded with `load_delegate` (libedgetpu.so.1, a vendor NPU
  delegate), XNNPACK (LiteRT's default CPU delegate), or the plain reference kernels.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edgefn.errors import ModelError

CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Delegate:
    """One step of a delegate chain for one backend format ("onnx" or "tflite")."""

    name: str
    format: str
    provider: str | None = None  # onnxruntime: the execution provider
    library: str | None = None  # LiteRT: an external delegate library (a file name or a path)
    requires_variant: str | None = None  # runs only this variant (e.g. tflite-edgetpu: compiled for the TPU)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def accelerated(self) -> bool:
        """Runs on something else than the CPU (so it is worth trying before every CPU variant)."""
        if self.format == "onnx":
            return self.provider not in (None, CPU_PROVIDER)
        return self.library is not None


ONNX_CPU = Delegate("cpu", "onnx", provider=CPU_PROVIDER)
XNNPACK = Delegate("xnnpack", "tflite")
LITERT_CPU = Delegate("cpu", "tflite", options={"reference_kernels": True})
# Without a device profile: the CPU, as every device has one.
DEFAULT_CHAINS: dict[str, tuple[Delegate, ...]] = {"onnx": (ONNX_CPU,), "tflite": (XNNPACK, LITERT_CPU)}


def onnxruntime() -> ModuleType:
    """The onnxruntime module (tests put a stand-in for a GPU build here, with the same interface); a
    ModelError says how to install it where it is missing (a Jetson installs no build by default)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("onnxruntime is not installed: pip install 'edgefn[cpu]' (the CPU build), or on a Jetson "
                         "NVIDIA's GPU build: pip install 'edgefn[jetson]' --extra-index-url "
                         "https://pypi.jetson-ai-lab.io/jp6/cu126") from None
    return ort


def ort_session(source: bytes | str, options: Any, delegate: Delegate) -> Any:
    """An onnxruntime session on `delegate`'s execution provider, or a ModelError saying why not."""
    ort = onnxruntime()
    provider = delegate.provider or CPU_PROVIDER
    available = ort.get_available_providers()
    if provider not in available:
        raise ModelError(f"{provider} is not in this onnxruntime build (it has: {', '.join(available)})")
    providers: list[Any] = [(provider, dict(delegate.options))] if delegate.options else [provider]
    if provider != CPU_PROVIDER:
        providers.append(CPU_PROVIDER)  # for the nodes the accelerator does not take
    session = ort.InferenceSession(source, options, providers=providers)
    used = session.get_providers()
    if not used or used[0] != provider:
        raise ModelError(f"{provider} failed to initialise (onnxruntime fell back to {', '.join(used) or 'nothing'})")
    return session


def resolve_library(library: str, search: Sequence[Path]) -> str:
    """A delegate library's path: the first of `search` that holds it, else the name for the loader."""
    if "/" in library:
        return library
    for folder in search:
        candidate = Path(folder) / library
        if candidate.exists():
            return str(candidate)
    return library


def litert_options(delegate: Delegate, search: Sequence[Path], load_delegate: Any) -> dict[str, Any]:
    """Keyword arguments for LiteRT's Interpreter that put it on `delegate`."""
    if delegate.library is not None:
        path = resolve_library(delegate.library, search)
        try:
            ctypes.CDLL(path)  # the loader's own reason when it is missing (LiteRT's Delegate is not
            # built for that: its __del__ fails on the half-made object)
            loaded = load_delegate(path, {k: str(v) for k, v in delegate.options.items()})
        except (OSError, ValueError, RuntimeError) as exc:  # missing library; its create call refused
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"delegate library {delegate.library} did not load: {reason}") from None
        return {"experimental_delegates": [loaded]}
    if delegate.options.get("reference_kernels"):
        return {"experimental_op_resolver_type": _resolver_without_default_delegates()}
    return {}


def _resolver_without_default_delegates() -> Any:
    try:
        from ai_edge_litert.interpreter import OpResolverType
    except ImportError:
        from tflite_runtime.interpreter import OpResolverType  # type: ignore[no-redef]
    return OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def chains_from_profile(profile: Any, state_dir: Path) -> dict[str, tuple[Delegate, ...]]:
    """A device profile's delegate chains (edgefn.profiles.Profile), by the format each backend runs.

    Formats without a backend here (RKNN's .rknn files) are left out: no variant of theirs can load."""
    chains: dict[str, tuple[Delegate, ...]] = {}
    for fmt in DEFAULT_CHAINS:
        chains[fmt] = tuple(Delegate(spec.name, fmt, provider=spec.provider, library=spec.library,
                                     requires_variant=spec.requires_variant, options=spec.options_in(state_dir))
                            for spec in profile.delegates_for(fmt))
    return chains
