"""Quarantine: payloads that keep crashing a function are refused without entering its sandbox.

A trap costs far more than an event: the call that traps, the instance thrown away, a fresh one
made, and the good events of its batch run again. Only traps, timeouts and out-of-memory count as
strikes; an error value the guest returns on purpose never does. Two tiers:

  payload  the payload's hash: the same bytes that failed `strikes` times within `window_s` (a
           replay, a stuck sensor) are refused for `hold_s`. Any trap, timeout or out-of-memory.
  fault    a stack overflow, learnt by what trapped rather than by the bytes: its key is the guest
           functions that recursed when the stack ran out (the trap's backtrace) and the function's
           version, so poison that changes its bytes and its depth at every event still lands on
           one fault. Once `strikes` different payloads overflowed the stack in the same frames,
           all of them JSON nested deeper than DEEP, JSON nested at least as deep as one of them is
           refused for `hold_s` (`Fault` says why that is safe).

A suspect runs alone, so that it cannot spoil a batch of good events again: a payload struck before,
or JSON nested deeper than DEEP while a stack fault of deep payloads is on record (struck but not yet
learnt, or learnt at a greater depth).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgefn.errors import FunctionError, GuestOutOfMemory, GuestStackOverflow, GuestTimeout, GuestTrap, Quarantined

STRIKES = (GuestTrap, GuestTimeout, GuestOutOfMemory)  # the failures that count; never GuestError

DEEP = 64  # nesting no ordinary sensor JSON reaches (a few levels): deeper is unusual, never poison by itself
CHUNK = 8192  # bytes scanned at a time: a payload deeper than a learnt fault is known by its first chunk
_OPENS = re.compile(rb"\s*[\[{]")
_ESCAPED = re.compile(rb"\\.", re.DOTALL)  # a backslash and what it escapes: never a string's end
_QUOTE = ord('"')


def _steps(opener: bytes, closer: bytes) -> bytes:
    table = bytearray(256)
    table[opener[0]], table[closer[0]] = 1, 255  # int8 -1
    return bytes(table)


_ARRAY_STEPS, _OBJECT_STEPS = _steps(b"[", b"]"), _steps(b"{", b"}")

Point = tuple[int, int]  # (arrays, objects) open at the place where a JSON document nests deepest


def _pieces(payload: bytes) -> list[tuple[bytes, np.ndarray | None]]:
    """The payload in pieces to scan in turn, each with its mask of bytes outside strings (None: all).
    The first piece holds every string (up to the last quote, CHUNK at least), its escapes dropped, so
    that each quote left opens or closes one; the others hold none."""
    strings_end = max(CHUNK, payload.rfind(b'"') + 1)
    head = _ESCAPED.sub(b"", payload[:strings_end])
    quotes = np.frombuffer(head, np.uint8) == _QUOTE
    inside = np.cumsum(quotes, dtype=np.int32) & 1
    pieces: list[tuple[bytes, np.ndarray | None]] = [(head, inside == 0)]
    if inside[-1:].any():
        return pieces  # a string that never ends: no bracket past its quote nests anything
    return pieces + [(payload[k:k + CHUNK], None) for k in range(strings_end, len(payload), CHUNK)]


def nesting(payload: bytes, enough: tuple[Point, ...] = ()) -> Point | None:
    """(arrays, objects) open where JSON nests deepest, brackets inside strings not counted; None for
    JSON nested DEEP levels or less, and for anything else (not an array or object, a closer before its
    opener). With `enough`, it stops at the first chunk whose deepest place holds at least as many
    arrays and objects open as one of those points. Linear in the payload's size, whatever it holds."""
    if len(payload) <= CHUNK and payload.count(b"[") + payload.count(b"{") <= DEEP:
        return None  # nearly every payload stops here, at the cost of two byte counts
    if not _OPENS.match(payload):
        return None
    deepest, arrays, objects = (0, 0), 0, 0
    for piece, outside in _pieces(payload):
        a_steps = np.frombuffer(piece.translate(_ARRAY_STEPS), np.int8)
        o_steps = np.frombuffer(piece.translate(_OBJECT_STEPS), np.int8)
        if not len(a_steps):
            continue
        if outside is not None:
            a_steps, o_steps = a_steps * outside, o_steps * outside
        a = a_steps.cumsum(dtype=np.int32) + arrays
        o = o_steps.cumsum(dtype=np.int32) + objects
        if int(a.min()) < 0 or int(o.min()) < 0:
            return None
        total = a + o
        at = int(total.argmax())
        if total[at] > sum(deepest):
            deepest = (int(a[at]), int(o[at]))
        if any(_covers(deepest, point) for point in enough):
            break
        arrays, objects = int(a[-1]), int(o[-1])
    return deepest if sum(deepest) > DEEP else None


def _covers(place: Point, point: Point) -> bool:
    return place[0] >= point[0] and place[1] >= point[1]


def _spelt(point: Point) -> str:
    return " and ".join(f"{n:,} {kind}{'' if n == 1 else 's'}" for n, kind in zip(point, ("array", "object"), strict=True))


@dataclass
class _Record:
    since: float  # the first strike of the current window
    strikes: int = 0
    until: float = 0.0  # refused until then (monotonic clock); 0: not quarantined
    last: str = ""  # the last failure, for the refusal's message


@dataclass
class Fault:
    """A stack overflow in a function's `version`, `where` the guest recursed: what it has learnt.

    Why its rule cannot refuse a good event: it refuses only JSON that holds, at its deepest place, at
    least as many arrays *and* at least as many objects open as one payload that overflowed the stack in
    these same frames of this same version held at its deepest. A parser (or handler) that recurses per
    level needs at least as much stack for it, so it would overflow too: such an event could never have
    been answered. Counting arrays and objects apart matters: an object level costs the guest more stack
    than an array level (digits: 988 nested objects overflow, 1,123 arrays), so a rule learnt from
    objects must not refuse arrays as deep. It needs `strikes` different payloads, each nested deeper than
    DEEP (no sensor sends that); one payload not nested deep that overflowed in these frames shows that
    depth does not drive this fault, and it never learns a rule then. A payload nested deep, short of every
    learnt point, is not refused: it runs alone, and if it overflows too the rule learns its point."""

    version: str
    where: str
    since: float  # the first strike of the current window
    payloads: set[bytes] = field(default_factory=set)  # hashes of the different payloads that overflowed
    points: list[Point] = field(default_factory=list)  # their deepest places, the least ones only
    by_depth: bool = True  # False once a payload not nested deep overflowed here
    until: float = 0.0  # its rule refuses until then; 0: not learnt

    KEPT = 64  # payloads and points on record at most: enough to count strikes, bounded under any flood

    def learn(self, digest: bytes, point: Point | None) -> None:
        if len(self.payloads) < self.KEPT:
            self.payloads.add(digest)
        if point is None:
            self.by_depth = False
        elif not any(_covers(point, known) for known in self.points) and len(self.points) < self.KEPT:
            self.points = [known for known in self.points if not _covers(known, point)] + [point]

    def describe(self, place: Point) -> str:
        least = " or ".join(_spelt(point) for point in self.points)
        where = f" in {self.where}" if self.where else ""
        return (f"JSON nested {_spelt(place)} deep, as deep as one of "
                f"{len(self.payloads)} payloads that overflowed the guest's stack{where} (version "
                f"{self.version or '?'}; the shallowest: {least})")


class Quarantine:
    """Strikes and refusals of one function's payloads and the faults they caused; thread-safe."""

    def __init__(self, *, strikes: int = 3, window_s: float = 600.0, hold_s: float = 600.0,
                 max_entries: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.strikes, self.window_s, self.hold_s, self.max_entries = strikes, window_s, hold_s, max_entries
        self._clock = clock
        self._table: OrderedDict[bytes, _Record] = OrderedDict()  # payload hashes
        self._faults: OrderedDict[tuple[str, str], Fault] = OrderedDict()  # (version, where)
        self._lock = threading.Lock()
        self.refused = 0  # events answered Quarantined since start

    @property
    def entries(self) -> int:
        """Payloads and faults on record (struck or quarantined), each at most max_entries."""
        return len(self._table) + len(self._faults)

    def screen(self, payload: bytes) -> Quarantined | bool:
        """The refusal for a quarantined payload; else True for a suspect (to run alone), False otherwise."""
        if not self._table and not self._faults:  # nothing ever struck (nearly always): no hashing on the hot path
            return False
        now = self._clock()
        suspect = self._screen_faults(payload, now)
        if isinstance(suspect, Quarantined):  # before hashing: a learnt fault's poison is usually new bytes
            return suspect
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        with self._lock:
            record = self._table.get(digest)
            if record is None:
                return suspect
            if record.until > now:
                self._table.move_to_end(digest)
                self.refused += 1
                return Quarantined(f"this payload failed {record.strikes} times within {self.window_s:.0f} s "
                                   f"(last: {record.last}); refused without running for {record.until - now:.0f} s more")
            if record.until:  # its quarantine is over: it starts again from no strike
                del self._table[digest]
                return suspect
            return suspect or now - record.since <= self.window_s

    def _screen_faults(self, payload: bytes, now: float) -> Quarantined | bool:
        with self._lock:
            for key, fault in list(self._faults.items()):
                if (fault.until and fault.until <= now) or (not fault.until and now - fault.since > self.window_s):
                    del self._faults[key]  # its hold or its window is over: it starts again from no strike
            faults = [f for f in self._faults.values() if f.by_depth]
        if not faults:
            return False
        place = nesting(payload, tuple(p for f in faults if f.until for p in f.points))
        if place is None:
            return False
        for fault in faults:
            if fault.until and any(_covers(place, point) for point in fault.points):
                with self._lock:
                    self.refused += 1
                return Quarantined(f"{fault.describe(place)} within {self.window_s:.0f} s; refused without "
                                   f"running for {fault.until - now:.0f} s more")
        return True  # nested deep while a stack fault of deep payloads is on record: it runs alone

    def strike(self, payload: bytes, error: FunctionError, version: str = "") -> None:
        """Count a failure of this payload (run alone, so it is the culprit) if it is a trap, a timeout
        or out-of-memory; a stack overflow also teaches its fault (of the function's `version`)."""
        if not isinstance(error, STRIKES):
            return
        digest, now = hashlib.blake2b(payload, digest_size=16).digest(), self._clock()
        point = nesting(payload) if isinstance(error, GuestStackOverflow) else None
        with self._lock:
            record = self._table.get(digest)
            if record is None or now - record.since > self.window_s:
                record = self._table[digest] = _Record(since=now)
            record.strikes += 1
            record.last = f"{error.reason}: {error}"
            if record.strikes >= self.strikes:
                record.until = now + self.hold_s
            self._table.move_to_end(digest)
            if isinstance(error, GuestStackOverflow):
                self._learn(error.where, version, digest, point, now)
            for table in (self._table, self._faults):
                while len(table) > self.max_entries:
                    table.popitem(last=False)

    def _learn(self, where: str, version: str, digest: bytes, point: Point | None, now: float) -> None:
        key = (version, where)
        fault = self._faults.get(key)
        if fault is None or (not fault.until and now - fault.since > self.window_s):
            fault = self._faults[key] = Fault(version, where, since=now)
        fault.learn(digest, point)
        if fault.by_depth and not fault.until and len(fault.payloads) >= self.strikes:
            fault.until = now + self.hold_s
        self._faults.move_to_end(key)
