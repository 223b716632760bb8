"""`edgefn cloud check`: whether an endpoint can take a model's inference over, asked before a device
relies on it.

For each model: is it ready there; do its names, datatypes and shapes agree with the local model.json
(the same plan the hand-off makes); and one real inference of the model's validation sample (its
`validation.npz`, else one row of zeros), compared with the local answer. Integer outputs (labels)
must agree on `min_agreement` of the rows, float outputs with a second dimension on their top class
as often; the largest difference of the float values is reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefn.errors import CloudError, ModelError
from edgefn.inference.tensors import from_wire, to_wire
from edgefn.protocol import oip

if TYPE_CHECKING:
    from edgefn.inference.model import ModelInfo
    from edgefn.inference.registry import ModelRegistry
    from edgefn.offload.client import CloudClient

MIN_AGREEMENT = 0.95


@dataclass
class ModelCheck:
    """What the endpoint does with one model; `problem` is None when it can take it over."""

    model: str
    served_as: str
    variant: str = "-"  # the local variant compared with
    ready: bool = False
    inputs: list[str] = field(default_factory=list)  # as sent: "pixels FP32 [-1, 64]"
    outputs: list[str] = field(default_factory=list)  # as read back, after fitting them to the local ones
    declared: str = "-"  # what the endpoint's metadata lists
    rows: int = 0  # of the validation sample
    agreement: float | None = None  # the lowest of the outputs' row agreements
    max_difference: float | None = None  # of the float outputs
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_model(client: CloudClient, registry: ModelRegistry, model: str,
                min_agreement: float = MIN_AGREEMENT) -> ModelCheck:
    """One model's check against the endpoint (never raises for what the endpoint does: see `problem`)."""
    info = registry.info(model)
    route = client.route(model)
    check = ModelCheck(model, route.name)
    check.ready = client.ready(model)
    check.inputs = [_spec_text(route.there(s.name), s.dtype, s.shape) for s in info.inputs]
    try:
        check.declared = _declared_text(client.metadata(model))
        client.plan(model, info)
        sample = _sample(info)
        check.rows = len(sample[0]) if sample[0].ndim else 1
        wire = [to_wire(x) for x in sample]
        there = [from_wire(t) for t in client.infer(model, wire, contract=info)]
        here = [from_wire(t) for t in registry.infer(model, wire)]
        check.variant = registry.choice(model).variant
    except CloudError as exc:
        check.problem = f"{exc.reason}: {exc}"
        return check
    except ModelError as exc:
        check.problem = f"the local model cannot run its sample: {exc}"
        return check
    check.outputs = [_spec_text(route.there(s.name), str(a.dtype), a.shape)
                     for s, a in zip(info.outputs, there, strict=True)]
    check.agreement, check.max_difference = _compare(here, there)
    if not check.ready:
        check.problem = "the endpoint says the model is not ready"
    elif check.agreement is not None and check.agreement < min_agreement:
        check.problem = (f"its answers agree with the local ones on {check.agreement:.1%} of the rows "
                         f"(at least {min_agreement:.0%} needed)")
    return check


def _sample(info: ModelInfo) -> list[np.ndarray]:
    """The model's validation inputs (`x`, or one array per input name), else one row of zeros."""
    path = info.folder / "validation.npz"
    if path.is_file():
        with np.load(path) as data:
            if len(info.inputs) == 1 and "x" in data:
                return [np.asarray(data["x"], dtype=info.inputs[0].dtype)]
            if all(s.name in data for s in info.inputs):
                return [np.asarray(data[s.name], dtype=s.dtype) for s in info.inputs]
    return [np.zeros([1 if d < 0 else d for d in s.shape], dtype=s.dtype) for s in info.inputs]


def _compare(here: list[np.ndarray], there: list[np.ndarray]) -> tuple[float | None, float | None]:
    """(lowest row agreement over the outputs that have one, largest difference of the float outputs)."""
    agreements, difference = [], None
    for a, b in zip(here, there, strict=True):
        if a.shape != b.shape:
            agreements.append(0.0)
            continue
        if a.dtype.kind in "iub":
            rows = a.reshape(len(a), -1) if a.ndim else a.reshape(1, -1)
            agreements.append(float(np.mean(np.all(rows == b.reshape(rows.shape), axis=1))))
        elif a.dtype.kind == "f" and a.size:
            gap = float(np.max(np.abs(a.astype(np.float64) - b)))
            difference = gap if difference is None else max(difference, gap)
            if a.ndim == 2 and a.shape[1] > 1:
                agreements.append(float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))))
    return (min(agreements) if agreements else None), difference


def _spec_text(name: str, dtype: str, shape: Any) -> str:
    try:
        kind = oip.datatype(dtype)
    except oip.ProtocolError:
        kind = str(dtype)
    return f"{name} {kind} {list(shape)}"


def _declared_text(metadata: dict[str, Any]) -> str:
    """What the endpoint's metadata lists, in a few words."""
    parts = []
    for kind in ("inputs", "outputs"):
        entries = metadata.get(kind) or []
        if isinstance(entries, list):
            names = [f"{e.get('name')} {e.get('datatype')} {e.get('shape')}" for e in entries if isinstance(e, dict)]
            parts.append(f"{kind}: {', '.join(names) if names else 'none'}")
    return "; ".join(parts) or "-"
