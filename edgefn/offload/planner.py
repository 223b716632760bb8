"""Where a function's inference runs: here, or on the cloud endpoint (the hand-off decision).

Per function, the planner keeps the measured service time of one event here (an exponentially
weighted mean over the batches its workers ran) and decides, for each batch a worker takes:

- `never`: here. `always`: the cloud (the device only pre- and post-processes).
- `on-overload`: the cloud when the work queued here, this batch included, cannot be served within
  the latency budget by the function's workers, or when the device is under thermal (critical) or
  memory pressure; else here. Surplus goes out, the rest keeps its local latency.
- `on-low-confidence`: here; the host asks the cloud again when the local answer's top score is
  below the function's threshold (joint inference).

Whatever the plan, a cloud call that fails (breaker open, endpoint away, timeout) runs here instead,
so no event is lost to the hand-off.
"""

from __future__ import annotations

import threading
from typing import Literal

Policy = Literal["never", "on-overload", "on-low-confidence", "always"]
POLICIES: tuple[str, ...] = ("never", "on-overload", "on-low-confidence", "always")
Where = Literal["local", "cloud"]

_WEIGHT = 0.2  # of the newest batch in the mean service time: follows a change within a few batches


class Planner:
    """The hand-off decision of one function (thread-safe: its workers share it)."""

    def __init__(self, policy: Policy, budget_ms: float, workers: int, initial_s: float = 0.001):
        if policy not in POLICIES:
            raise ValueError(f"offload policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.budget_s, self.workers = policy, budget_ms / 1000.0, max(1, workers)
        self._per_event_s = initial_s
        self._lock = threading.Lock()

    @property
    def per_event_s(self) -> float:
        return self._per_event_s

    def served_here(self, events: int, seconds: float) -> None:
        """A batch of `events` ran here in `seconds` (sandbox and inference)."""
        if events <= 0:
            return
        with self._lock:
            self._per_event_s += _WEIGHT * (seconds / events - self._per_event_s)

    def where(self, batch: int, queued_behind: int, under_pressure: bool = False) -> Where:
        """Where the inference of a batch just taken runs, given what waits behind it."""
        if self.policy == "always":
            return "cloud"
        if self.policy != "on-overload":
            return "local"
        if under_pressure:
            return "cloud"
        backlog_s = (batch + queued_behind) * self._per_event_s / self.workers
        return "cloud" if backlog_s > self.budget_s else "local"
