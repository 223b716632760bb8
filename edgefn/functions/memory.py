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

`private_bytes()` reads how much of an instance's memories is its own in RAM, from /proc/self/pagemap: the pages
the guest wrote (copy-on-write copies of the memory image, its heap grown), not the image's pages it only read
(the page cache's, shared) nor those it never touched. That is what the instance adds to the device's memory,
read for that instance alone, whatever other threads allocate meanwhile.

Cost: two reads of the map per watched instantiation (each about 0.4 ms with a couple of hundred mappings, up
to 1.5 ms on a busy 2-core machine), made under a process-wide lock, so instantiations of different
functions wait for each other. With metering off (`unwatched()`) only the lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_MAPS = "/proc/self/maps"
_RESERVATION = 1 << 30  # a PROT_NONE mapping this large is the unused part of a linear memory's reservation
_PAGEMAP = "/proc/self/pagemap"
_PAGE = os.sysconf("SC_PAGE_SIZE")
# The top byte of a pagemap entry, bits 56-63: present (63), file-backed or shared (61), mapped by this process
# alone (56). 1 for a page that is the process's own in RAM; a shared zero page is not exclusive: 0.
_OWN = bytes(int(top & 0xA1 == 0x81) for top in range(256))
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


def private_bytes(bases: Iterable[int], span: int) -> int | None:
    """The bytes of the linear memories at `bases` (a live instance's: a freed one's addresses may be someone
    else's), each at most `span` long, that are resident and this process's own. None where the pagemap
    cannot be read. About 0.1 ms for a 64 MiB span: the kernel walks only those page tables."""
    pages = span // _PAGE
    own = 0
    try:
        with open(_PAGEMAP, "rb", buffering=0) as pagemap:
            for base in bases:
                pagemap.seek(base // _PAGE * 8)
                entries = pagemap.read(pages * 8) or b""
                own += entries[7::8].translate(_OWN).count(1)
    except OSError:
        return None
    return own * _PAGE
