"""How much linear memory a guest instance holds, read from the process's own memory map (Linux).

wasmtime-py exposes no component instance's memory, but wasmtime lays each linear memory out the same
way: a reservation of several GiB, its first `size` bytes readable and writable, the rest PROT_NONE
until the guest grows into it. A WebAssembly memory never shrinks, so the readable part is also the
instance's peak. `watch()` notes the memories an instantiation creates (their bases: the reservation
does not move): those in the map after it that were not there before it. `sizes()` reads what each
holds now. Where there is no /proc/self/maps (not Linux), nothing is found and the size reads 0.

Why a read before each one, not a set of bases known from earlier reads: a store's memories are unmapped
whenever Python frees it (a garbage-collected cycle: later than its instance was dropped), and the kernel
gives the same addresses to the next memory mapped; a base remembered from the past then names someone
else's memory. Every instantiation, watched or not (`unwatched()`), holds the same lock, so nothing is
mapped by another instantiation between the two reads.

Cost: two reads of the map per watched instantiation (each about 0.4 ms with a couple of hundred mappings, up
to 1.5 ms on a busy 2-core machine), made under a process-wide lock, so instantiations of different
functions wait for each other. With metering off (`unwatched()`) only the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_MAPS = "/proc/self/maps"
_RESERVATION = 1 << 30  # a PROT_NONE mapping this large is the unused part of a linear memory's reservation
_instantiating = threading.Lock()  # one instantiation at a time, so that what appears in the map is its own


def _regions() -> list[tuple[int, int, bool]]:
    """(start, end, accessible) of each mapping, in address order."""
    try:
        with open(_MAPS, encoding="ascii") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    regions = []
    for line in lines:
        span, perms = line.split(None, 2)[:2]
        start, _, end = span.partition("-")
        regions.append((int(start, 16), int(end, 16), perms.startswith("rw")))
    return regions


def _bases(regions: list[tuple[int, int, bool]]) -> dict[int, int]:
    """base -> accessible bytes of every linear memory in the map: a large PROT_NONE reservation and the
    readable-writable mappings that run up to it without a gap."""
    found: dict[int, int] = {}
    for i, (start, end, accessible) in enumerate(regions):
        if accessible or end - start < _RESERVATION:
            continue
        base = start
        j = i - 1
        while j >= 0 and regions[j][2] and regions[j][1] == base:
            base = regions[j][0]
            j -= 1
        found[base] = start - base
    return found


@contextmanager
def watch() -> Iterator[list[int]]:
    """Around an instantiation: the list it yields holds, afterwards, the bases of the memories it made."""
    made: list[int] = []
    with _instantiating:
        before = _bases(_regions())
        yield made
        made.extend(base for base in _bases(_regions()) if base not in before)


@contextmanager
def unwatched() -> Iterator[list[int]]:
    """Around an instantiation whose memories are not wanted (metering off): no read of the map, only the
    lock, so that it never maps in the middle of a watched one."""
    with _instantiating:
        yield []


def sizes(bases: Iterable[Iterable[int]]) -> list[int]:
    """The accessible bytes of each group of memories (an instance's), read from one look at the map."""
    now = _bases(_regions())
    return [sum(now.get(base, 0) for base in group) for group in bases]
