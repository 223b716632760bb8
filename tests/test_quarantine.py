"""Quarantine alone, with a fake clock: strikes, refusals, expiry, the bounded table, JSON shapes."""

from __future__ import annotations

import json

import pytest

from edgefn.errors import GuestError, GuestOutOfMemory, GuestTimeout, GuestTrap, OutputRejected, Quarantined
from edgefn.functions.quarantine import Quarantine, json_shape

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


def test_quarantine_shape_after_distinct_deep_payloads(quarantine: Quarantine):
    for i in range(3):
        quarantine.strike(deep(2000, f"p{i}"), TRAP)
    refusal = quarantine.screen(deep(2000, "never seen"))
    assert isinstance(refusal, Quarantined)
    assert str(refusal).startswith("JSON nested 1024-2047 levels deep, 2048-4095 bytes, like this payload, failed 3")
    assert quarantine.screen(deep(1000, "shallower class")) is False
    assert quarantine.screen(deep(4000, "larger class")) is False
    assert quarantine.screen(json.dumps({"id": "x", "pixels": [0] * 64}).encode()) is False


def test_quarantine_shape_is_struck_once_per_distinct_payload(quarantine: Quarantine):
    for _ in range(3):
        quarantine.strike(deep(2000, "same"), TRAP)
    assert isinstance(quarantine.screen(deep(2000, "same")), Quarantined)
    assert quarantine.screen(deep(2000, "other")) is True  # a suspect of its shape, not refused


def test_quarantine_shallow_payloads_never_share_a_shape(quarantine: Quarantine):
    for i in range(50):
        quarantine.strike(json.dumps({"id": i, "pixels": [[i]] * 64}).encode(), TRAP)
    assert quarantine.screen(json.dumps({"id": "new", "pixels": [[1]] * 64}).encode()) is False


@pytest.mark.parametrize(("payload", "shape"), [
    (b"", None),
    (json.dumps({"id": "x", "pixels": [0] * 64}).encode(), None),
    (json.dumps([[1, 2]] * 500).encode(), None),  # many brackets, shallow
    (b"[" * 64 + b"]" * 64, None),  # exactly DEEP: still ordinary
    (b"[" * 65, (7, 7)),
    (b"  " + b"[" * 2000, (11, 11)),
    (deep(2000), (11, 12)),
    (b"x" + b"[" * 100, None),  # not JSON
    (b"]" + b"[" * 100, None),
    (b"[]]" + b"[" * 100, None),  # a closer before its opener
])
def test_json_shape(payload: bytes, shape):
    assert json_shape(payload) == shape
