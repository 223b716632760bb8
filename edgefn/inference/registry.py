"""Models by name, each with its variants; per model, the registry runs the best variant it can.

A model folder holds `model.json` and the files of its variants:

    {"name": "digits", "inputs": [{"name", "dtype", "shape"}], "outputs": [...], "dataset", "train", "validation",
     "variants": [{"name": "fp32", "file": "model.onnx", "format": "onnx", "precision": "fp32", "sparsity": 0.0,
                   "accuracy": 0.9144, "size": 21022, "sha256": "...", "made_by": "..."}, ...]}

On a model's first use the registry ranks its variants (`preference`, or the caller's pin), opens the
first one it can (backend installed, file present, sha256 as recorded, accepted by the runtime,
inputs and outputs as model.json names them) and records why each other one was passed over
(`choice`). A backend is shared by every function and thread.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from edgefn.errors import ModelError
from edgefn.inference import delegates
from edgefn.inference.delegates import DEFAULT_CHAINS, ONNX_CPU, XNNPACK, Delegate
from edgefn.inference.tensors import WireTensor, from_wire, to_wire


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


class Backend(Protocol):
    """A loaded model that runs on this device: `run` takes the inputs in model.json's order and
    returns the outputs in model.json's order."""

    name: str
    format: str
    delegate: str
    inputs: list[TensorSpec]
    outputs: list[str]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


def check_inputs(model: str, specs: Sequence[TensorSpec], inputs: Sequence[np.ndarray]) -> None:
    """A clear error for what a caller got wrong, before the runtime gives an obscure one."""
    if len(inputs) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise ModelError(f"model {model} takes {len(specs)} input(s) ({names}), got {len(inputs)}")
    for spec, array in zip(specs, inputs, strict=True):
        if not spec.accepts(array):
            raise ModelError(f"model {model}: input {spec.name!r} must be {spec.describe()}, "
                             f"got {array.dtype} [{', '.join(str(d) for d in array.shape)}]")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _match(path: Path, kind: str, wanted: Sequence[str] | None, found: Sequence[str]) -> list[str]:
    """The names model.json gives, each checked against the file's; the file's own when none are given."""
    if wanted is None:
        return list(found)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ModelError(f"{path}: model.json names {kind} {missing} but the file has {list(found)}")
    return list(wanted)


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
            raise ModelError(f"{path}: onnxruntime cannot load it: {_first_line(exc)}") from None
        own = {i.name: TensorSpec(i.name, _ORT_DTYPES.get(i.type, i.type),
                                  tuple(d if isinstance(d, int) else -1 for d in i.shape))
               for i in self._session.get_inputs()}
        names = _match(path, "inputs", [s.name for s in inputs] if inputs is not None else None, list(own))
        self.inputs = _agree(path, inputs, own, names)
        self.outputs = _match(path, "outputs", outputs, [o.name for o in self._session.get_outputs()])
        self._input_names = names

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        check_inputs(self.name, self.inputs, inputs)
        try:
            return self._session.run(self.outputs, dict(zip(self._input_names, inputs, strict=True)))
        except Exception as exc:
            raise ModelError(f"model {self.name}: {_first_line(exc)}") from None


def _agree(path: Path, declared: Sequence[TensorSpec] | None, own: Mapping[str, TensorSpec],
           names: Sequence[str]) -> list[TensorSpec]:
    """model.json's input specs, refused where the file takes another dtype; the file's own without them."""
    if declared is None:
        return [own[n] for n in names]
    for spec in declared:
        if own[spec.name].dtype != spec.dtype:
            raise ModelError(f"{path}: model.json says input {spec.name!r} is {spec.dtype}, "
                             f"the file takes {own[spec.name].dtype}")
    return list(declared)


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
        raise ModelError(f"tflite-runtime cannot be imported ({_first_line(exc)}); "
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
        names = _match(path, "inputs", [s.name for s in inputs] if inputs is not None else None, list(own))
        # The runner resizes every input to the array given, so the batch dimension is free even where
        # the converter wrote a fixed one.
        self.inputs = _agree(path, inputs, {n: TensorSpec(n, s.dtype, (-1, *s.shape[1:])) for n, s in own.items()},
                             names)
        self.outputs = _match(path, "outputs", outputs, list(runner.get_output_details()))

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
                raise ModelError(f"{self._path}: LiteRT cannot load it: {_first_line(exc)}") from None
            self._local.runner = runner
        return runner

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        check_inputs(self.name, self.inputs, inputs)
        try:
            result = self._runner()(**{s.name: a for s, a in zip(self.inputs, inputs, strict=True)})
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {self.name}: {_first_line(exc)}") from None
        return [result[n] for n in self.outputs]


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


# The default preference (a device profile can give another order of precisions), "int8 on CPU":
# 1. int8 before fp32: on the CPUs of edge boards (Cortex-A, x86 with VNNI) int8 kernels are faster and
#    the file is a quarter of the size; `edgefn model optimize` registers no variant that lost more
#    than its --max-drop. (On a tiny model and a desktop CPU int8 can be slower; pin fp32 there.)
# 2. dense before pruned, least sparse first: neither onnxruntime nor LiteRT has sparse CPU kernels for
#    these ops, so zeroed weights save no time and no memory at run time (only bytes in a compressed
#    download), while they cost some accuracy. A pruned variant runs when no dense one of its
#    precision can.
# 3. ONNX before TFLite: onnxruntime is always installed, and it is the runtime the benchmarks measure.
# 4. higher validation accuracy first; then the order of model.json.
DEFAULT_PRECISIONS = ("int8", "fp16", "fp32")
_FORMAT_RANK = {"onnx": 0, "tflite": 1}


def preference(variant: Variant, precisions: Sequence[str] = DEFAULT_PRECISIONS) -> tuple:
    """Sort key: the earlier in `precisions` (a device profile's order), dense, ONNX, more accurate."""
    precision = "int8" if variant.precision == "uint8" else variant.precision
    rank = precisions.index(precision) if precision in precisions else len(precisions)
    return (rank, variant.sparsity, _FORMAT_RANK.get(variant.format, 2), -(variant.accuracy or 0.0))


def _ranked_below(loser: Variant, winner: Variant) -> str:
    """Why `loser` comes after `winner` in the preference, in words."""
    if loser.precision != winner.precision:
        return f"{winner.precision} before {loser.precision}"
    if loser.sparsity != winner.sparsity:
        return "dense before pruned" if winner.sparsity == 0 else "less sparse first"
    if loser.format != winner.format:
        return f"{winner.format} before {loser.format}"
    if loser.accuracy != winner.accuracy:
        return f"higher accuracy first ({winner.accuracy} > {loser.accuracy})"
    return "listed later in model.json"


@dataclass(frozen=True)
class Choice:
    """The variant and delegate a model runs on here, and why each other one was passed over."""

    model: str
    variant: str
    format: str
    delegate: str
    # (what, reason), best-ranked first; `what` is a variant, or `variant@delegate` for what failed
    # on one delegate only.
    passed_over: tuple[tuple[str, str], ...]


def choose(info: ModelInfo, pinned: str | None = None, verify: bool = True,
           chains: Mapping[str, Sequence[Delegate]] | None = None,
           precisions: Sequence[str] = DEFAULT_PRECISIONS, search: Sequence[Path] = ()) -> tuple[Backend, Choice]:
    """Open the best (variant, delegate) that runs here and say why the others were not used.

    `chains` is the device profile's delegate chain per format. Accelerated delegates are tried
    first, each with the variants it can run in the order of `precisions`; then the CPU delegates
    the same way. A pinned variant is the only one tried (on each delegate of its chain)."""
    chains = chains or DEFAULT_CHAINS
    rank = lambda v: preference(v, precisions)  # noqa: E731
    ranked = [info.variant(pinned)] if pinned is not None else sorted(info.variants, key=rank)
    # Delegates that run only a variant made for them (an Edge TPU's compiled file) the model lacks.
    missing = [(f"{d.requires_variant}@{d.name}", f"{d.name} runs only a {d.requires_variant} variant, and "
                f"model {info.name} has none")
               for chain in chains.values() for d in chain
               if d.requires_variant is not None and d.requires_variant not in info.variant_names()]
    attempts: list[tuple[Variant, Delegate | None]] = []
    for accelerated in (True, False):
        for variant in ranked:
            if variant.format not in BACKENDS or not chains.get(variant.format):
                if not accelerated:
                    attempts.append((variant, None))  # open_variant (or the loop below) says why
                continue
            attempts += [(variant, d) for d in chains[variant.format]
                         if d.accelerated == accelerated and d.requires_variant in (None, variant.name)]
    failures: dict[str, list[tuple[str, str]]] = {v.name: [] for v in ranked}
    files: dict[str, bytes | ModelError] = {}  # each file read and hashed once, whatever the delegates tried
    for variant, delegate in attempts:
        try:
            if delegate is None and variant.format in BACKENDS:
                raise ModelError(f"the device profile has no delegate for {variant.format}")
            if variant.format in BACKENDS and variant.name not in files:
                try:
                    files[variant.name] = read_variant(info, variant, verify)
                except ModelError as exc:
                    files[variant.name] = exc
            content = files.get(variant.name)
            if isinstance(content, ModelError):
                raise content
            backend = open_variant(info, variant, verify, delegate, search, content)
        except ModelError as exc:
            failures[variant.name].append((delegate.name if delegate else "-", str(exc)))
            continue
        passed = missing + _passed_over(ranked, variant, failures, attempts)
        if pinned is not None:
            passed += [(v.name, f"not pinned (pinned: {pinned})") for v in info.variants if v.name != pinned]
        return backend, Choice(info.name, variant.name, variant.format, backend.delegate, tuple(passed))
    if pinned is not None:
        reasons = "; ".join(f"{why}" for _, why in _passed_over(ranked, None, failures, attempts))
        raise ModelError(f"model {info.name}: pinned variant {pinned} cannot run here: {reasons}")
    reasons = "; ".join(f"{what}: {why}" for what, why in missing + _passed_over(ranked, None, failures, attempts))
    raise ModelError(f"model {info.name}: no variant can run here: {reasons}")


def _passed_over(ranked: Sequence[Variant], winner: Variant | None, failures: Mapping[str, list[tuple[str, str]]],
                 attempts: Sequence[tuple[Variant, Delegate | None]]) -> list[tuple[str, str]]:
    """Per variant: one reason where every delegate it was tried on failed alike (or it was not reached),
    else a reason per delegate."""
    out: list[tuple[str, str]] = []
    for variant in ranked:
        failed = failures[variant.name]
        tried_all = len(failed) == sum(1 for v, _ in attempts if v is variant)
        if variant is not winner and failed and tried_all and len({why for _, why in failed}) == 1:
            out.append((variant.name, failed[0][1]))
            continue
        out += [(f"{variant.name}@{delegate}", why) for delegate, why in failed]
        if variant is not winner and winner is not None and not tried_all:
            out.append((variant.name, f"ranked below {winner.name}: {_ranked_below(variant, winner)}"))
    return out


class ModelRegistry:
    """Every model under the given folders, each loaded on first use as its best runnable variant.

    `variants` pins a model to a variant by name (model -> variant): the pin wins, and a pinned variant
    that cannot run is an error rather than a silent fallback. `chains` (delegates per format) and
    `precisions` come from the device profile; `search` holds folders to find delegate libraries in
    before the system loader's path. `on_load(choice)` is called once per model, when it is loaded.
    """

    def __init__(self, folders: Sequence[Path], verify: bool = True, variants: Mapping[str, str] | None = None,
                 on_load: Callable[[Choice], None] | None = None,
                 chains: Mapping[str, Sequence[Delegate]] | None = None,
                 precisions: Sequence[str] = DEFAULT_PRECISIONS, search: Sequence[Path] = ()):
        self._chains, self._precisions, self._search = chains, tuple(precisions), tuple(search)
        self._infos: dict[str, ModelInfo] = {}
        for folder in folders:
            for meta in sorted(Path(folder).glob("*/model.json")):
                info = ModelInfo.read(meta.parent)
                self._infos.setdefault(info.name, info)
        self._pins = dict(variants or {})
        for model, variant in self._pins.items():
            self.info(model).variant(variant)  # an unknown model or variant fails now, not on first use
        self._loaded: dict[str, Backend] = {}
        self._choices: dict[str, Choice] = {}
        self._lock = threading.Lock()
        self._verify = verify
        self._on_load = on_load

    def names(self) -> list[str]:
        return sorted(self._infos)

    def info(self, name: str) -> ModelInfo:
        info = self._infos.get(name)
        if info is None:
            known = ", ".join(self.names()) or "none"
            raise ModelError(f"no model named {name!r} (known: {known})")
        return info

    def get(self, name: str) -> Backend:
        backend = self._loaded.get(name)
        if backend is not None:
            return backend
        with self._lock:
            if name not in self._loaded:
                backend, choice = self._load(name)
                self._choices[name] = choice
                self._loaded[name] = backend
                if self._on_load is not None:
                    self._on_load(choice)
            return self._loaded[name]

    def choice(self, name: str) -> Choice:
        """Which variant `name` runs as (loading it if it is not loaded yet), and what was passed over."""
        self.get(name)
        return self._choices[name]

    def _load(self, name: str) -> tuple[Backend, Choice]:
        return choose(self.info(name), self._pins.get(name), self._verify, self._chains, self._precisions,
                      self._search)

    def infer(self, name: str, inputs: list[WireTensor]) -> list[WireTensor]:
        backend = self.get(name)
        return [to_wire(out) for out in backend.run([from_wire(t) for t in inputs])]
