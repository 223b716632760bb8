"""The interface every backend implements (`Backend`), and what the backends share: the input and
output names model.json declares checked against the file's own, and a runtime's error in one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edgefn.errors import ModelError
from edgefn.inference.model import TensorSpec


class Backend(Protocol):
    """A loaded model that runs on this device: `run` takes the inputs in model.json's order and
    returns the outputs in model.json's order."""

    name: str
    format: str
    delegate: str
    inputs: list[TensorSpec]
    outputs: list[str]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


def first_line(exc: BaseException) -> str:
    """The first line of a runtime's error, for a ModelError of one line."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def match_names(path: Path, kind: str, wanted: Sequence[str] | None, found: Sequence[str]) -> list[str]:
    """The names model.json gives, each checked against the file's; the file's own when none are given."""
    if wanted is None:
        return list(found)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ModelError(f"{path}: model.json names {kind} {missing} but the file has {list(found)}")
    return list(wanted)


def agree_inputs(path: Path, declared: Sequence[TensorSpec] | None, own: Mapping[str, TensorSpec],
                 names: Sequence[str]) -> list[TensorSpec]:
    """model.json's input specs, refused where the file takes another dtype; the file's own without them."""
    if declared is None:
        return [own[n] for n in names]
    for spec in declared:
        if own[spec.name].dtype != spec.dtype:
            raise ModelError(f"{path}: model.json says input {spec.name!r} is {spec.dtype}, "
                             f"the file takes {own[spec.name].dtype}")
    return list(declared)
