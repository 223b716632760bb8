"""How a local model meets the endpoint's: the request built from what the device knows, the answer read
back into the local model's outputs.

The device knows its model from its `model.json` (input and output names, dtypes, shapes), and a guest
expects the cloud's answer to look exactly like the local one. So:

- the inputs are named as the local model names them (or as `--cloud-model` renames them); the
  endpoint's metadata is only a check, where it lists any (MLServer lists none unless its
  model-settings declare them);
- the outputs are asked for by name and read by name, whatever their order in the answer;
- an answer is made to fit the local output: `[N, 1]` where the local model says `[N]` (MLServer and
  KServe wrap a 1-D label so), FP64 where it says float32 (scikit-learn's probabilities), as long as
  the values keep their kind (a float never becomes an integer) and their count.

A model with no local `model.json` (known only there) is sent as the endpoint's metadata describes it,
and its answer comes back as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefn.errors import CloudError, ConfigError
from edgefn.protocol import oip

if TYPE_CHECKING:
    from edgefn.inference.model import ModelInfo, TensorSpec


@dataclass(frozen=True)
class Route:
    """Where a local model is on the endpoint: its name there, and its tensors' names there where they
    differ (`--cloud-model digits=digits-sk,label=predict,probabilities=predict_proba`)."""

    name: str
    tensors: Mapping[str, str] = field(default_factory=dict)

    def there(self, tensor: str) -> str:
        return self.tensors.get(tensor, tensor)


def parse_routes(model_map: Mapping[str, str]) -> dict[str, Route]:
    """MODEL -> "NAME[,TENSOR=NAME...]" (the values of `--cloud-model MODEL=...`) as routes."""
    routes = {}
    for model, value in model_map.items():
        name, *renames = value.split(",")
        pairs = [r.split("=", 1) for r in renames]
        if not name or any(len(p) != 2 or not all(p) for p in pairs):
            raise ConfigError(f"--cloud-model {model}={value}: give MODEL=NAME, then TENSOR=NAME for each input "
                              "or output named otherwise there, all separated by commas")
        routes[model] = Route(name, dict(pairs))
    return routes


@dataclass(frozen=True)
class Plan:
    """One model's exchange, settled once: the input names there; the outputs to ask for, each with the
    local output it becomes (None: no local model.json, every output comes back as answered)."""

    model: str  # the name there
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, TensorSpec], ...] | None


def plan(route: Route, contract: ModelInfo | None, metadata: Mapping[str, Any] | None) -> Plan:
    """The exchange for a model, from its local contract, checked against the endpoint's metadata where it
    lists inputs or outputs. A `CloudError` (reason `mismatch`) says what does not agree."""
    declared_in, declared_out = _declared(metadata, "inputs", route), _declared(metadata, "outputs", route)
    if contract is None:
        if not declared_in:
            raise CloudError(f"model {route.name}: no local model.json describes it and the endpoint's metadata "
                             "lists no inputs: nothing says what to send", reason="mismatch")
        return Plan(route.name, tuple(declared_in), None)
    problems = [*_disagreements(contract.inputs, declared_in, route, "input", exact=True),
                *_disagreements(contract.outputs, declared_out, route, "output", exact=False)]
    if problems:
        raise CloudError(f"model {route.name} on the endpoint is not the local {contract.name}: "
                         + "; ".join(problems), reason="mismatch")
    return Plan(route.name, tuple(route.there(s.name) for s in contract.inputs),
                tuple((route.there(s.name), s) for s in contract.outputs))


def _declared(metadata: Mapping[str, Any] | None, kind: str, route: Route) -> dict[str, dict[str, Any]]:
    """The endpoint's declared tensors of `kind`, by name ({} where it declares none)."""
    entries = (metadata or {}).get(kind) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                for e in entries):
        raise CloudError(f"model {route.name}: unusable metadata: '{kind}' is not a list of named tensors",
                         reason="bad-answer")
    return {e["name"]: e for e in entries}


def _disagreements(specs: Sequence[TensorSpec], declared: Mapping[str, dict[str, Any]], route: Route,
                   kind: str, exact: bool) -> list[str]:
    """What the endpoint declares against the local specs: a missing or extra name (extra: inputs only,
    since an output not asked for does no harm), a datatype that is not the local one (inputs) or not
    of its kind (outputs), a fixed dimension that differs."""
    if not declared:
        return []
    problems = []
    wanted = {route.there(s.name): s for s in specs}
    if missing := [n for n in wanted if n not in declared]:
        problems.append(f"it has no {kind} {', '.join(missing)} (it declares {', '.join(declared)})")
    if exact and (extra := [n for n in declared if n not in wanted]):
        problems.append(f"it takes {kind}s the local model has not: {', '.join(extra)}")
    for name, spec in wanted.items():
        entry = declared.get(name)
        if entry is None:
            continue
        local = np.dtype(spec.dtype)
        try:
            there = oip.dtype_of(entry.get("datatype"), lenient=True)
        except oip.ProtocolError as exc:
            problems.append(f"{kind} {name}: {exc}")
            continue
        if there != local if exact else not np.can_cast(there, local, "same_kind"):
            problems.append(f"{kind} {name} is {oip.datatype(there)} there, {oip.datatype(local)} here")
        shape = entry.get("shape")
        if isinstance(shape, list) and not _shapes_agree(spec.shape, shape):
            problems.append(f"{kind} {name} has shape {shape} there, {list(spec.shape)} here")
    return problems


def _shapes_agree(here: Sequence[int], there: Sequence[Any]) -> bool:
    """Fixed dimensions agree, compared from the last one (a server may leave the batch dimension out)."""
    for a, b in zip(reversed(here), reversed(there), strict=False):
        if isinstance(a, int) and isinstance(b, int) and a >= 0 and b >= 0 and a != b:
            return False
    return True


def conform(plan: Plan, answered: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The answer's outputs as the local model gives them, in its order. A `CloudError` (reason
    `bad-answer`) names what is missing or cannot fit."""
    if plan.outputs is None:
        return list(answered.values())
    if missing := [n for n, _ in plan.outputs if n not in answered]:
        raise CloudError(f"model {plan.model}: the answer has no output {', '.join(missing)} (it has "
                         f"{', '.join(answered) or 'none'})", reason="bad-answer")
    return [_fit(name, answered[name], spec, plan.model) for name, spec in plan.outputs]


def _fit(name: str, array: np.ndarray, spec: TensorSpec, model: str) -> np.ndarray:
    local = np.dtype(spec.dtype)
    if array.dtype != local:
        if not np.can_cast(array.dtype, local, "same_kind") or not _fits_range(array, local):
            raise CloudError(f"model {model}: output {name} is {oip.datatype(array.dtype)}, which cannot become "
                             f"the local {oip.datatype(local)} without changing its values", reason="bad-answer")
        array = array.astype(local)
    rows = array.shape[0] if array.ndim else 1
    shape = [rows if i == 0 and d < 0 else d for i, d in enumerate(spec.shape)]
    if list(array.shape) == shape:
        return array
    if shape.count(-1) > 1 or (-1 not in shape and math.prod(shape) != array.size):
        raise CloudError(f"model {model}: output {name} has shape {list(array.shape)}, which does not fit the "
                         f"local {list(spec.shape)}", reason="bad-answer")
    try:
        return array.reshape(shape)
    except ValueError:
        raise CloudError(f"model {model}: output {name} has shape {list(array.shape)}, which does not fit the "
                         f"local {list(spec.shape)}", reason="bad-answer") from None


def _fits_range(array: np.ndarray, dtype: np.dtype) -> bool:
    """Whether narrowing integers keeps every value (float narrowing only rounds: allowed)."""
    if dtype.kind not in "iu" or array.size == 0:
        return True
    info = np.iinfo(dtype)
    return bool(array.min() >= info.min and array.max() <= info.max)
