"""The device's memory budget for sandbox instances, shared by every function of the daemon.

A device profile's `[capacity] memory_budget_mb` says how much memory the functions' warm instances
may hold together. An instance reserves its measured size before it is created and gives it back
when it is dropped; a reservation that does not fit is refused, so no scale-up ever goes past the
budget. What an instance weighs is measured, not guessed, and only what it adds: `anon_rss_bytes`
around its instantiation (under the instantiation lock), plus what its first call wrote to its own
linear memories (`edgefn.functions.memory.private_bytes`: that instance's pages alone, so neither the
host's allocations nor other instances' first calls running at the same time count; see `FunctionSandbox`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc's; absent from musl


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS: glibc keeps what a dropped store freed (its
    allocations are small) in its arenas otherwise, and scaling down would free little."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def anon_rss_bytes() -> int:
    """The process's resident memory that is its own (anonymous: heap, wasm linear memories, stacks),
    without file-backed and shared pages (mapped compiled code, the shared memory images of modules),
    which every instance of a component shares and which stay mapped while the component is loaded."""
    with open("/proc/self/statm", "rb") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


class MemoryBudget:
    """Bytes reserved by instances against a total (None: unbounded). Thread-safe."""

    def __init__(self, total_bytes: int | None):
        self.total = total_bytes
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Take `nbytes` if they fit; False (and nothing taken) if they do not."""
        with self._lock:
            if self.total is not None and self.used + nbytes > self.total:
                return False
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)

    def snapshot(self) -> dict[str, float | None]:
        """For /healthz: the budget and what instances hold of it, in MiB."""
        with self._lock:
            total = None if self.total is None else round(self.total / 2**20, 1)
            return {"budget_mb": total, "used_mb": round(self.used / 2**20, 1),
                    "peak_mb": round(self.peak / 2**20, 1)}
