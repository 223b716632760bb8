"""health.json: sample events a bundle's new functions must answer as expected (`HealthCheck`), and
the check itself (`run_health`, `check_health`) a device runs before it trusts a release.

A sample may carry a `label`: the value the function's answer must hold at the check's `label_key`
(digits: the digit shown). A wrong label fails nothing by itself; the share of labelled samples
answered right is the release's accuracy on this device, through the delegates it chose (a TensorRT
fp16 engine or an NPU's quantizer can change the numbers), and a rollout's gate holds it
(`accuracy>=0.9`).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgefn.errors import BundleError, validation_text
from edgefn.topics import is_errors_topic

# run(topic, payload) -> [(topic, payload), ...]: one event through the functions under test.
RunEvent = Callable[[str, bytes], Sequence[tuple[str, bytes]]]


class Expect(BaseModel):
    """One output a sample must produce: this topic, these JSON values, numbers within these bounds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    topic: str = Field(description="The output's topic, exactly.")
    json_subset: dict[str, Any] = Field(default_factory=dict, alias="json",
                                        description="Keys the output's JSON object must hold, with these values.")
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict,
                                                   description="Keys whose value must be a number in [lo, hi].")

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for key, (lo, hi) in value.items():
            if lo > hi:
                raise ValueError(f"bounds {key!r}: [{lo}, {hi}] is empty (lo > hi)")
        return value

    def mismatch(self, topic: str, payload: bytes) -> str | None:
        """Why the output (topic, payload) is not this one; None when it is."""
        if topic != self.topic:
            return f"topic {topic}"
        if not self.json_subset and not self.bounds:
            return None
        try:
            doc = json.loads(payload)
        except ValueError:
            return "payload is not JSON"
        if not isinstance(doc, dict):
            return "payload is not a JSON object"
        for key, want in self.json_subset.items():
            if key not in doc:
                return f"no {key!r}"
            if doc[key] != want:
                return f"{key}={json.dumps(doc[key])}, want {json.dumps(want)}"
        for key, (lo, hi) in self.bounds.items():
            value = doc.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{key}={json.dumps(value)} is not a number"
            if not lo <= value <= hi:
                return f"{key}={value:g} outside [{lo:g}, {hi:g}]"
        return None

    def describe(self) -> str:
        parts = [self.topic]
        parts += [f"{k}={json.dumps(v)}" for k, v in self.json_subset.items()]
        parts += [f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in self.bounds.items()]
        return " ".join(parts)


class Sample(BaseModel):
    """One event of the health check and the outputs it must produce."""

    model_config = ConfigDict(extra="forbid")

    topic: str = Field(description="The topic the event arrives on.")
    payload: Any = Field(default=None, description="The payload as JSON (sent as UTF-8 JSON text).")
    payload_b64: str | None = Field(default=None, description="The payload as bytes, base64 (instead of payload).")
    expect: list[Expect] = Field(default_factory=list, description="Outputs that must be among the event's.")
    label: Any = Field(default=None, description="The right answer: the value an output's JSON must hold at the "
                                                 "check's label_key (counted into the accuracy, never a failure).")

    @model_validator(mode="after")
    def _one_payload(self) -> Sample:
        if (self.payload is None) == (self.payload_b64 is None):
            raise ValueError("give exactly one of payload (JSON) and payload_b64 (bytes)")
        if self.payload_b64 is not None:
            try:
                base64.b64decode(self.payload_b64, validate=True)
            except ValueError:
                raise ValueError("payload_b64 is not base64") from None
        return self

    def payload_bytes(self) -> bytes:
        if self.payload_b64 is not None:
            return base64.b64decode(self.payload_b64)
        return json.dumps(self.payload, separators=(",", ":")).encode()


class HealthCheck(BaseModel):
    """health.json: sample events the new functions must answer as expected before a device trusts them."""

    model_config = ConfigDict(extra="forbid")

    samples: list[Sample] = Field(min_length=1, description="The sample events, run in order.")
    label_key: str = Field(default="label", min_length=1,
                           description="The key of an output's JSON object that a labelled sample's label is "
                                       "compared with.")


def load_health(path: Path) -> HealthCheck:
    """Read and validate a health.json; BundleError names the file and what is wrong."""
    try:
        return HealthCheck.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the health check: {exc.strerror or exc}") from None
    except ValidationError as exc:
        raise BundleError(f"{path}: {validation_text(exc)}") from None


def _assign(candidates: list[list[int]]) -> list[int | None]:
    """For each expectation, a distinct output among its candidates (bipartite matching); None where none is left."""
    owner: dict[int, int] = {}

    def place(i: int, seen: set[int]) -> bool:
        for out in candidates[i]:
            if out not in seen:
                seen.add(out)
                if out not in owner or place(owner[out], seen):
                    owner[out] = i
                    return True
        return False

    for i in range(len(candidates)):
        place(i, set())
    chosen: list[int | None] = [None] * len(candidates)
    for out, i in owner.items():
        chosen[i] = out
    return chosen


def _show(topic: str, payload: bytes) -> str:
    text = payload.decode("utf-8", "replace")
    return f"{topic} {text[:200]}{'...' if len(text) > 200 else ''}"


@dataclass
class HealthResult:
    """What the health check found: its failures (empty: healthy), and of the labelled samples, how many
    were answered right."""

    failures: list[str] = field(default_factory=list)
    labelled: int = 0
    right: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.right / self.labelled if self.labelled else None


def check_health(samples: Iterable[Sample], run: RunEvent) -> list[str]:
    """Run every sample through `run` and say what went wrong, one line a problem (empty: healthy)."""
    return run_health(HealthCheck(samples=list(samples)), run).failures


def run_health(check: HealthCheck, run: RunEvent) -> HealthResult:
    """Run every sample through `run`: each expectation must match its own output (same topic, `json` a
    subset of the output's JSON, `bounds` numbers within range); no output may be an error (topic
    edgefn/errors/...); an exception from `run` fails its sample. A labelled sample is right when one of
    its outputs holds its label at `label_key`."""
    result = HealthResult()
    for n, sample in enumerate(check.samples, 1):
        where = f"sample {n} ({sample.topic})"
        labelled = sample.label is not None
        result.labelled += labelled
        try:
            outputs = [(str(t), bytes(p)) for t, p in run(sample.topic, sample.payload_bytes())]
        except Exception as exc:  # noqa: BLE001 - whatever the new functions raise fails the check
            result.failures.append(f"{where}: {type(exc).__name__}: {exc}")
            continue
        result.failures += [f"{where}: error output {_show(t, p)}" for t, p in outputs if is_errors_topic(t)]
        result.right += labelled and any(_holds(p, check.label_key, sample.label)
                                         for t, p in outputs if not is_errors_topic(t))
        candidates = [[i for i, (t, p) in enumerate(outputs) if e.mismatch(t, p) is None] for e in sample.expect]
        for expect, chosen in zip(sample.expect, _assign(candidates), strict=True):
            if chosen is not None:
                continue
            reasons = [f"{_show(t, p)} ({e})" for t, p in outputs if (e := expect.mismatch(t, p))]
            seen = "; ".join(reasons) if reasons else "no output" if not outputs else "its match went to another"
            result.failures.append(f"{where}: expected {expect.describe()}; got {seen}")
    return result


def _holds(payload: bytes, key: str, label: Any) -> bool:
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    return isinstance(doc, dict) and key in doc and doc[key] == label
