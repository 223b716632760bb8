"""What the hand-off to the cloud endpoint has done lately, said out loud: for /healthz, `edgefn status`
and the log.

A hand-off that fails runs the work here, so without this nobody would notice an endpoint that never
answers right: the first failure of each kind (model and reason) is a warning with its cause, then at
most one line a minute for that kind, with a count of the ones skipped; the first success after
failures says so once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefn.observe.logs import Every

if TYPE_CHECKING:
    from edgefn.errors import CloudError

log = logging.getLogger("edgefn.offload")

LOG_EVERY_S = 60.0


class HandoffStatus:
    """The hand-off's recent outcomes for one endpoint (thread-safe)."""

    def __init__(self, url: str, *, log_every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.time):
        self.url, self._log_every_s, self._clock = url, log_every_s, clock
        self._lock = threading.Lock()
        self._gates: dict[tuple[str, str], Every] = {}
        self._failures: Counter[str] = Counter()  # by reason
        self._handed_off = 0
        self._last_ok: float | None = None
        self._last_error: dict[str, Any] | None = None
        self._failing: set[str] = set()  # models whose last hand-off failed

    def succeeded(self, model: str) -> None:
        with self._lock:
            self._handed_off += 1
            self._last_ok = self._clock()
            recovered = model in self._failing
            self._failing.discard(model)
        if recovered:
            log.warning("hand-off of %s to %s works again", model, self.url)

    def failed(self, model: str, exc: CloudError) -> None:
        with self._lock:
            self._failures[exc.reason] += 1
            self._last_error = {"model": model, "reason": exc.reason, "error": str(exc), "at": self._clock()}
            self._failing.add(model)
            gate = self._gates.get((model, exc.reason))
            if gate is None:
                gate = self._gates[(model, exc.reason)] = Every(self._log_every_s)
        if (skipped := gate.due()) is not None:
            log.warning("hand-off of %s to %s failed (%s), it runs here instead: %s%s", model, self.url,
                        exc.reason, exc, f" ({skipped} more like it since the last line)" if skipped else "")

    def snapshot(self) -> dict[str, Any]:
        """`state`: idle (nothing handed off yet), ok (every model's last hand-off went through) or failing
        (some model's did not: `failing` names them); counts, and the last error."""
        with self._lock:
            state = "failing" if self._failing else "ok" if self._handed_off else "idle"
            return {"url": self.url, "state": state, "failing": sorted(self._failing), "handed_off": self._handed_off,
                    "failures": dict(self._failures), "last_ok": self._last_ok,
                    "last_error": dict(self._last_error) if self._last_error else None}
