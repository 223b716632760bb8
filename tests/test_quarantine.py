"""Quarantine alone, with a fake clock: strikes, refusals, expiry, the bounded table, learnt stack faults;
then shape-varying poison through a real digits sandbox."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from sklearn.datasets import load_digits

from edgefn.errors import (
    FunctionError,
    GuestError,
    GuestOutOfMemory,
    GuestStackOverflow,
    GuestTimeout,
    GuestTrap,
    OutputRejected,
    Quarantined,
)
from edgefn.events import Event
from edgefn.functions.build import component_path
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import load_manifest
from edgefn.functions.quarantine import Quarantine, nesting
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from tests.conftest import MODELS

TRAP = GuestTrap("stack overflow")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def quarantine(clock: Clock) -> Quarantine:
    return Quarantine(strikes=3, window_s=60, hold_s=600, max_entries=100, clock=clock)


def deep(depth: int, tag: str = "") -> bytes:
    """JSON nested `depth` levels deep; `tag` makes the bytes differ, not the shape."""
    return f'{{"id": "{tag}", "v": '.encode() + b"[" * depth + b"]" * depth + b"}"


def test_quarantine_after_strikes_refuses_with_reason(quarantine: Quarantine):
    assert quarantine.screen(b"poison") is False
    for _ in range(2):
        quarantine.strike(b"poison", TRAP)
        assert quarantine.screen(b"poison") is True  # a suspect: struck, not yet refused
    quarantine.strike(b"poison", TRAP)
    refusal = quarantine.screen(b"poison")
    assert isinstance(refusal, Quarantined) and refusal.reason == "quarantined"
    assert str(refusal) == ("this payload failed 3 times within 60 s (last: trap: stack overflow); "
                            "refused without running for 600 s more")
    assert quarantine.refused == 1
    assert quarantine.screen(b"good") is False


@pytest.mark.parametrize("error", [GuestTrap("x"), GuestTimeout("x"), GuestOutOfMemory("x")])
def test_quarantine_counts_traps_timeouts_and_out_of_memory(quarantine: Quarantine, error):
    for _ in range(3):
        quarantine.strike(b"p", error)
    assert isinstance(quarantine.screen(b"p"), Quarantined)


@pytest.mark.parametrize("error", [GuestError("refused on purpose"), OutputRejected("too many")])
def test_quarantine_never_counts_errors_the_guest_returns(quarantine: Quarantine, error):
    for _ in range(10):
        quarantine.strike(b"p", error)
    assert quarantine.screen(b"p") is False
    assert quarantine.entries == 0


def test_quarantine_strikes_outside_the_window_do_not_add_up(quarantine: Quarantine, clock: Clock):
    for _ in range(5):
        quarantine.strike(b"p", TRAP)
        quarantine.strike(b"p", TRAP)
        clock.now += 61
        assert quarantine.screen(b"p") is False  # two strikes, then the window passed


def test_quarantine_expires_after_hold(quarantine: Quarantine, clock: Clock):
    for _ in range(3):
        quarantine.strike(b"p", TRAP)
    clock.now += 599
    assert isinstance(quarantine.screen(b"p"), Quarantined)
    clock.now += 2
    assert quarantine.screen(b"p") is False  # tried again, from no strike
    quarantine.strike(b"p", TRAP)
    assert quarantine.screen(b"p") is True


def test_quarantine_table_is_bounded_least_recently_used_first(clock: Clock):
    quarantine = Quarantine(strikes=1, max_entries=4, clock=clock)
    for i in range(10):
        quarantine.strike(f"p{i}".encode(), TRAP)
        assert quarantine.entries <= 4
    assert all(quarantine.screen(f"p{i}".encode()) is False for i in range(6))
    assert all(isinstance(quarantine.screen(f"p{i}".encode()), Quarantined) for i in range(6, 10))


STACK = GuestStackOverflow(where="_parse_array_unicode, scan_once_unicode")


def nested_objects(depth: int, tag: str = "") -> bytes:
    return f'{{"id": "{tag}", "v": '.encode() + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


def test_quarantine_fault_learnt_from_different_deep_payloads_refuses_deeper_ones(quarantine: Quarantine):
    for i, depth in enumerate((30000, 2000, 9000)):
        assert quarantine.screen(deep(depth, f"p{i}")) is (i > 0)  # deep, once a stack fault is on record: alone
        quarantine.strike(deep(depth, f"p{i}"), STACK, "1.0.0")
    for depth in (2000, 2001, 4000, 65000):  # any shape as deep as the shallowest that overflowed
        refusal = quarantine.screen(deep(depth, "never seen"))
        assert isinstance(refusal, Quarantined), depth
    assert str(quarantine.screen(deep(2500, "x"))) == (
        "JSON nested 2,500 arrays and 1 object deep, as deep as one of 3 payloads that overflowed the guest's "
        "stack in _parse_array_unicode, scan_once_unicode (version 1.0.0; the shallowest: 2,000 arrays and "
        "1 object) within 60 s; refused without running for 600 s more")
    assert quarantine.screen(deep(1999, "shallower")) is True  # not refused: it runs alone
    assert quarantine.screen(deep(63, "ordinary")) is False  # 63 arrays in an object: DEEP, no deeper
    assert quarantine.screen(json.dumps({"id": "x", "pixels": [0] * 64}).encode()) is False


def test_quarantine_fault_learns_a_shallower_point_from_a_suspect_that_overflows(quarantine: Quarantine):
    for i in range(3):
        quarantine.strike(deep(5000, f"p{i}"), STACK)
    assert quarantine.screen(deep(1500, "s")) is True
    quarantine.strike(deep(1500, "s"), STACK)
    assert isinstance(quarantine.screen(deep(1500, "other")), Quarantined)


def test_quarantine_fault_needs_different_payloads(quarantine: Quarantine):
    for _ in range(3):
        quarantine.strike(deep(2000, "same"), STACK)
    assert isinstance(quarantine.screen(deep(2000, "same")), Quarantined)  # the payload tier
    assert quarantine.screen(deep(2000, "other")) is True  # a suspect of the fault, not refused


@pytest.mark.parametrize("other", [
    {"where": "_parse_object_unicode, scan_once_unicode", "version": "1.0.0"},
    {"where": "_parse_array_unicode, scan_once_unicode", "version": "1.0.1"},
])
def test_quarantine_faults_apart_by_frames_and_version(quarantine: Quarantine, other: dict):
    quarantine.strike(deep(2000, "p0"), STACK, "1.0.0")
    quarantine.strike(deep(2000, "p1"), STACK, "1.0.0")
    quarantine.strike(deep(2000, "p2"), GuestStackOverflow(where=other["where"]), other["version"])
    assert quarantine.screen(deep(3000, "new")) is True  # two strikes and one: no fault learnt


def test_quarantine_fault_not_driven_by_depth_learns_no_rule(quarantine: Quarantine):
    quarantine.strike(b"stack", STACK)  # the same frames overflowed on a payload not nested deep
    for i in range(5):
        quarantine.strike(deep(2000, f"p{i}"), STACK)
    assert quarantine.screen(deep(3000, "new")) is False


def test_quarantine_fault_learnt_from_arrays_never_refuses_objects_and_back(quarantine: Quarantine):
    for i in range(3):
        quarantine.strike(nested_objects(1000, f"o{i}"), STACK)
    assert quarantine.screen(deep(1500, "arrays")) is True  # an array level needs less stack: it runs alone
    assert isinstance(quarantine.screen(nested_objects(1001, "objects")), Quarantined)


def test_quarantine_fault_ignores_brackets_in_strings(quarantine: Quarantine):
    for i in range(3):
        quarantine.strike(deep(2000, f"p{i}"), STACK)
    good = json.dumps({"id": "x", "note": "[" * 5000 + "\\\"" + "{" * 5000, "pixels": [0] * 64}).encode()
    assert quarantine.screen(good) is False


def test_quarantine_fault_expires_after_hold(quarantine: Quarantine, clock: Clock):
    for i in range(3):
        quarantine.strike(deep(2000, f"p{i}"), STACK)
    clock.now += 599
    assert isinstance(quarantine.screen(deep(3000, "x")), Quarantined)
    clock.now += 2
    assert quarantine.screen(deep(3000, "x")) is False  # tried again, from no strike


def test_quarantine_fault_strikes_outside_the_window_do_not_add_up(quarantine: Quarantine, clock: Clock):
    for i in range(6):
        quarantine.strike(deep(2000, f"p{i}"), STACK)
        if i % 2:
            clock.now += 61
    assert not isinstance(quarantine.screen(deep(3000, "x")), Quarantined)


@pytest.mark.parametrize(("payload", "point"), [
    (b"", None),
    (json.dumps({"id": "x", "pixels": [0] * 64}).encode(), None),
    (json.dumps([[1, 2]] * 500).encode(), None),  # many brackets, shallow
    (b"[" * 64 + b"]" * 64, None),  # exactly DEEP: still ordinary
    (b"[" * 65, (65, 0)),
    (b"  " + b"[" * 2000, (2000, 0)),
    (deep(2000), (2000, 1)),
    (deep(20000), (20000, 1)),  # past the first chunk
    (b"[" + b"{" * 40 + b"[ " * 40, (41, 40)),
    (nested_objects(100), (0, 101)),
    (b'{"s": "' + b"[" * 5000 + b'"}', None),  # in a string
    (b'{"s": "\\\\"' + b", " + b'"t": ' + b"[" * 100 + b"]" * 100 + b"}", (100, 1)),  # an escaped backslash ends it
    (b'{"s": "' + b"[" * 100, None),  # a string that never ends
    (b'{"s": "' + b'\\"' * 20000 + b"[" * 100, None),  # escaped quotes: no string ends
    (b"x" + b"[" * 100, None),  # not JSON
    (b"]" + b"[" * 100, None),
    (b"[]]" + b"[" * 100, None),  # a closer before its opener
])
def test_nesting(payload: bytes, point):
    assert nesting(payload) == point


def test_nesting_is_linear_in_the_payload():
    t0 = time.process_time()
    for payload in (b'["' + b'\\"' * 100_000, b'["' + b'"a' * 100_000, deep(100_000)):
        nesting(payload)
    assert time.process_time() - t0 < 2  # about 10 ms; a backtracking string pattern took minutes


# --- with the real digits function -----------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry([MODELS])


def test_quarantine_shape_varying_poison_traps_a_few_times_in_digits(runtime: Runtime, digits_fn: Path,
                                                                     registry: ModelRegistry):
    """Poison nested 1,200 to 65,000 levels deep, every one of its own depth (so its own shape):
    the quarantine learns the stack overflow after a few, and the good events are answered."""
    manifest = load_manifest(digits_fn)
    sandbox = FunctionSandbox(runtime, manifest, component_path(digits_fn, manifest),
                              FunctionHost(manifest.name, registry, StateStore(":memory:")))
    rng = random.Random(29)
    x, _ = load_digits(return_X_y=True)
    try:
        events: list[Event] = []
        for i in range(320):
            if i % 8 == 3:  # 40 poison
                payload = deep(round(1200 * (65000 / 1200) ** rng.random()), f"p{i}")
            else:
                payload = json.dumps({"id": f"g{i}", "pixels": [int(v) for v in x[1400 + i]]}).encode()
            events.append(Event(f"e{i}", "sensors/dev1/digits", payload, time.time() * 1000))
        answers = [a for k in range(0, len(events), 32) for a in sandbox.handle_batch(events[k:k + 32])]
        good = [a for i, a in enumerate(answers) if i % 8 != 3]
        poison = [a for i, a in enumerate(answers) if i % 8 == 3]
        assert all(not isinstance(a, FunctionError) and json.loads(a[0].payload)["label"] in range(10) for a in good)
        kinds = [a.reason for a in poison]
        assert set(kinds) == {"trap", "quarantined"}
        # 3 to learn it, then one for each poison shallower than every one before (here 3 more; the old
        # quarantine, keyed by the payload's shape, trapped on 3 of each depth class: 17 times)
        assert kinds.count("trap") <= 8, kinds
        assert kinds[:3] == ["trap"] * 3 and kinds.count("quarantined") >= 32
    finally:
        sandbox.close()
