"""Fuzzing what reaches the sandbox: payloads through the real digits function, and arguments
of host.infer through a real guest. Whatever comes in, the answer is messages or a clear error,
never a crash of the host and never a broken instance."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefn.errors import FunctionError, GuestError
from edgefn.events import Event
from edgefn.functions.build import component_path
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import load_manifest
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from tests.conftest import MODELS

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = {"event_id", "label", "score", "function", "version", "ran_on", "latency_ms"}


def _open(runtime: Runtime, folder: Path) -> FunctionSandbox:
    manifest = load_manifest(folder)
    host = FunctionHost(manifest.name, ModelRegistry([MODELS]), StateStore(":memory:"))
    return FunctionSandbox(runtime, manifest, component_path(folder, manifest), host)


@pytest.fixture(scope="module")
def digits(runtime: Runtime, digits_fn: Path) -> Iterator[FunctionSandbox]:
    sandbox = _open(runtime, digits_fn)
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="module")
def hostile(runtime: Runtime, hostile_fn: Path) -> Iterator[FunctionSandbox]:
    sandbox = _open(runtime, hostile_fn)
    yield sandbox
    sandbox.close()


def _answer(sandbox: FunctionSandbox, topic: str, payload: bytes):
    try:
        return sandbox.handle(Event("fuzz", topic, payload, 0.0))
    except FunctionError as exc:
        return exc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=70) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=80)


@FUZZ
@given(payload=st.binary(max_size=600))
def test_fuzz_digits_arbitrary_bytes_get_an_answer(digits: FunctionSandbox, payload: bytes):
    answer = _answer(digits, "sensors/f/digits", payload)
    assert isinstance(answer, (list, GuestError)), answer


@FUZZ
@given(doc=json_values, pixels=st.lists(st.integers(-5, 20) | st.floats(allow_nan=True) | st.text(max_size=3),
                                         min_size=60, max_size=68))
def test_fuzz_digits_json_documents_get_an_answer(digits: FunctionSandbox, doc: object, pixels: list):
    for body in (doc, {"id": "x", "pixels": pixels}):
        try:
            payload = json.dumps(body).encode()
        except (ValueError, RecursionError):
            continue
        answer = _answer(digits, "sensors/f/digits", payload)
        assert isinstance(answer, (list, GuestError)), answer
        if isinstance(answer, list):
            (message,) = answer
            assert set(json.loads(message.payload)) == KEYS
            usable = (isinstance(body, dict) and len(body.get("pixels") or []) == 64
                      and all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p)
                              and 0 <= p <= 16 for p in body["pixels"]))
            assert usable or all(p in (True, False) for p in body["pixels"] if isinstance(p, bool))


tensors = st.fixed_dictionaries({
    "dtype": st.sampled_from(["float32", "uint8", "int8", "int32", "int64"]),
    "shape": st.lists(st.integers(0, 70), max_size=4),
    "data": st.binary(max_size=600).map(bytes.hex),
})


@FUZZ
@given(model=st.sampled_from(["digits", "nope", ""]), inputs=st.lists(tensors, max_size=3))
def test_fuzz_host_infer_arguments_get_an_answer(hostile: FunctionSandbox, model: str, inputs: list):
    payload = b"infer:" + json.dumps({"model": model, "inputs": inputs}).encode()
    answer = _answer(hostile, "sensors/f/hostile", payload)
    assert isinstance(answer, (list, GuestError)), answer
    ok = _answer(hostile, "sensors/f/hostile", b"ok")
    assert isinstance(ok, list) and ok[0].payload == b"ok:fuzz"  # the instance still serves
