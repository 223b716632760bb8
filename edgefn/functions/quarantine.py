"""Quarantine: payloads that keep crashing a function are refused without entering its sandbox.

A trap costs far more than an event: the call that traps, the instance thrown away, a fresh one
made, and the good events of its batch run again. A payload that trapped `strikes` times within
`window_s` is therefore refused for `hold_s` with a `Quarantined` error. Only traps, timeouts and
out-of-memory count as strikes; an error value the guest returns on purpose never does.

Two tiers, each a key in one LRU table of bounded size:

  payload  the payload's hash: the same bytes sent again (a replay, a stuck sensor).
  shape    for JSON nested deeper than `DEEP` only: its depth class and size class (powers of
           two). Poison that varies its bytes (an id, a counter) keeps its shape; a shape is struck
           once per distinct payload, so it needs `strikes` different trapping payloads.

A payload struck at least once and not yet quarantined is a suspect: the sandbox runs it alone,
so it cannot spoil a batch of good events again.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgefn.errors import FunctionError, GuestOutOfMemory, GuestTimeout, GuestTrap, Quarantined

STRIKES = (GuestTrap, GuestTimeout, GuestOutOfMemory)  # the failures that count; never GuestError

# Why the shape tier cannot quarantine good traffic by accident: a payload has a shape only when
# its brackets nest deeper than DEEP (64), which ordinary sensor JSON never does (a few levels);
# its key keeps the depth and size classes, so only payloads as deep and as large as those that
# trapped share it; and it takes `strikes` different payloads that trapped. Brackets inside JSON
# strings count as well (the scan does not parse): at worst such a payload looks deep, and must
# still fall in both classes of the trapping ones.
DEEP = 64
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


def json_shape(payload: bytes) -> tuple[int, int] | None:
    """(nesting-depth class, size class) of JSON nested deeper than DEEP; None for any other payload."""
    if payload.count(b"[") + payload.count(b"{") <= DEEP:
        return None  # nearly every payload stops here, at the cost of two byte counts
    if payload.lstrip()[:1] not in (b"[", b"{"):
        return None
    depth = np.cumsum(_STEP[np.frombuffer(payload, np.uint8)], dtype=np.int32)
    deepest = int(depth.max())
    if deepest <= DEEP or int(depth.min()) < 0:  # a closer before its opener: not JSON
        return None
    return deepest.bit_length(), len(payload).bit_length()


def _describe(key: tuple) -> str:
    if key[0] == "payload":
        return "this payload"
    depth, size = key[1], key[2]
    return (f"JSON nested {1 << (depth - 1)}-{(1 << depth) - 1} levels deep, "
            f"{1 << (size - 1)}-{(1 << size) - 1} bytes, like this payload,")


@dataclass
class _Record:
    since: float  # the first strike of the current window
    strikes: int = 0
    until: float = 0.0  # refused until then (monotonic clock); 0: not quarantined
    last: str = ""  # the last failure, for the refusal's message


class Quarantine:
    """Strikes and refusals of one function's payloads; thread-safe."""

    def __init__(self, *, strikes: int = 3, window_s: float = 600.0, hold_s: float = 600.0,
                 max_entries: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.strikes, self.window_s, self.hold_s, self.max_entries = strikes, window_s, hold_s, max_entries
        self._clock = clock
        self._table: OrderedDict[tuple, _Record] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0  # events answered Quarantined since start

    @property
    def entries(self) -> int:
        """Payloads and shapes on record (struck or quarantined), at most max_entries."""
        return len(self._table)

    @staticmethod
    def _keys(payload: bytes) -> list[tuple]:
        keys: list[tuple] = [("payload", hashlib.blake2b(payload, digest_size=16).digest())]
        shape = json_shape(payload)
        if shape is not None:
            keys.append(("shape", *shape))
        return keys

    def screen(self, payload: bytes) -> Quarantined | bool:
        """The refusal for a quarantined payload; else True for a suspect (struck before), False otherwise."""
        if not self._table:  # nothing ever struck (nearly always): no hashing on the hot path
            return False
        keys, now = self._keys(payload), self._clock()
        suspect = False
        with self._lock:
            for key in keys:
                record = self._table.get(key)
                if record is None:
                    continue
                if record.until > now:
                    self._table.move_to_end(key)
                    self.refused += 1
                    return Quarantined(f"{_describe(key)} failed {record.strikes} times within "
                                       f"{self.window_s:.0f} s (last: {record.last}); refused without running "
                                       f"for {record.until - now:.0f} s more")
                if record.until:  # its quarantine is over: it starts again from no strike
                    del self._table[key]
                elif now - record.since <= self.window_s:
                    suspect = True
        return suspect

    def strike(self, payload: bytes, error: FunctionError) -> None:
        """Count a failure of this payload (run alone, so it is the culprit) if it is a trap, a timeout
        or out-of-memory."""
        if not isinstance(error, STRIKES):
            return
        keys, now = self._keys(payload), self._clock()
        with self._lock:
            fresh_payload = False
            for key in keys:
                record = self._table.get(key)
                if record is None or now - record.since > self.window_s:
                    record = self._table[key] = _Record(since=now)
                    fresh_payload = fresh_payload or key[0] == "payload"
                elif key[0] == "shape" and not fresh_payload:
                    continue  # the same payload again: its shape was struck for it already
                record.strikes += 1
                record.last = f"{error.reason}: {error}"
                if record.strikes >= self.strikes:
                    record.until = now + self.hold_s
                self._table.move_to_end(key)
            while len(self._table) > self.max_entries:
                self._table.popitem(last=False)
