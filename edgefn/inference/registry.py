"""Models by name, each with its variants; per model, the registry runs the best variant it can.

On a model's first use the registry reads its folder (`edgefn.inference.model`), ranks its variants
(`edgefn.inference.choice.preference`, or the caller's pin), opens the first one it can (backend
installed, file present, sha256 as recorded, accepted by the runtime, inputs and outputs as model.json
names them) and records why each other one was passed over (`choice`). A backend is shared by every
function and thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from edgefn.errors import ModelError
from edgefn.inference.backends.base import Backend
from edgefn.inference.choice import DEFAULT_PRECISIONS, Choice, choose
from edgefn.inference.delegates import Delegate
from edgefn.inference.measured import recorded
from edgefn.inference.model import ModelInfo
from edgefn.inference.tensors import WireTensor, from_wire, to_wire


class ModelRegistry:
    """Every model under the given folders, each loaded on first use as its best runnable variant.

    `variants` pins a model to a variant by name (model -> variant): the pin wins, and a pinned variant
    that cannot run is an error rather than a silent fallback. `chains` (delegates per format),
    `precisions` and `cpu_precisions` (the order on the CPU delegates) come from the device profile; `search`
    holds folders to find delegate libraries in
    before the system loader's path; `latency_file` holds the latencies measured here
    (edgefn.inference.measured), which rank the variants where recorded. `on_load(choice)` is called once per model, when it is loaded.
    """

    def __init__(self, folders: Sequence[Path], verify: bool = True, variants: Mapping[str, str] | None = None,
                 on_load: Callable[[Choice], None] | None = None,
                 chains: Mapping[str, Sequence[Delegate]] | None = None,
                 precisions: Sequence[str] = DEFAULT_PRECISIONS, search: Sequence[Path] = (),
                 latency_file: Path | None = None, cpu_precisions: Sequence[str] | None = None):
        self._chains, self._precisions, self._search = chains, tuple(precisions), tuple(search)
        self._cpu_precisions = tuple(cpu_precisions) if cpu_precisions is not None else None
        self._latency_file = latency_file
        self._infos: dict[str, ModelInfo] = {}
        self._folders = [str(f) for f in folders]
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
            if not self._infos:  # most often: run from a folder without ./models
                raise ModelError(f"no model named {name!r}: no model at all under {', '.join(self._folders) or '-'} "
                                 "(give the folder of models with --models)")
            raise ModelError(f"no model named {name!r} (known: {', '.join(self.names())})")
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
        info = self.info(name)
        latencies = recorded(self._latency_file, info) if self._latency_file is not None else None
        return choose(info, self._pins.get(name), self._verify, self._chains, self._precisions, self._search,
                      latencies, self._cpu_precisions)

    def infer(self, name: str, inputs: list[WireTensor]) -> list[WireTensor]:
        backend = self.get(name)
        return [to_wire(out) for out in backend.run([from_wire(t) for t in inputs])]
