"""Where a function's inference runs: here, or on the cloud endpoint (the hand-off decision).

Per function, the planner keeps the measured service time of one event here (an exponentially
weighted mean over the batches its workers ran) and decides, for each event as it arrives:

- `never`: here. `always`: the cloud (the device only pre- and post-processes).
- `on-overload`: an event joins the local queue while the work queued there ahead of it (the lane
  serves high-priority events first, so a low-priority one counts everything queued), itself included, can
  be served within the latency budget by the function's instances; else (or when the device is at
  its critical temperature or short of memory) the cloud lane, whose own workers and instances
  (`cloud_workers`) wait for the cloud's answers. So the local queue never holds more than a budget's
  worth of work: its events keep their local latency, and only the surplus goes out. When the cloud
  lane is itself backed up past the local backlog (the cloud slower than the surplus), the event
  joins whichever lane should finish it first: no lane queues without bound while the other is
  shorter.
- `on-low-confidence`: here; the host asks the cloud again when the local answer's top score is
  below the function's threshold (joint inference).

Whatever the plan, a cloud call that fails (breaker open, endpoint away, timeout) runs here instead,
so no event is lost to the hand-off.
"""

from __future__ import annotations

import threading
from typing import Literal

from edgefn.protocol.offload import POLICIES, Policy

Where = Literal["local", "cloud"]

_WEIGHT = 0.2  # of the newest batch in the mean service time: follows a change within a few batches


class Planner:
    """The hand-off decision of one function (thread-safe: its workers share it)."""

    def __init__(self, policy: Policy, budget_ms: float, workers: int, initial_s: float = 0.001,
                 cloud_workers: int = 4, cloud_initial_s: float = 0.0):
        if policy not in POLICIES:
            raise ValueError(f"offload policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.budget_s, self.workers = policy, budget_ms / 1000.0, max(1, workers)
        self.cloud_workers = max(1, cloud_workers)
        self._per_event_s = initial_s
        self._cloud_per_event_s = cloud_initial_s  # 0 until measured: the cloud lane is tried first
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

    def served_on_cloud(self, events: int, seconds: float) -> None:
        """A batch of `events` ran through the cloud lane in `seconds` (round trips included)."""
        if events <= 0:
            return
        with self._lock:
            self._cloud_per_event_s += _WEIGHT * (seconds / events - self._cloud_per_event_s)

    def overloaded(self, queued_here: int) -> bool:
        """Whether a new event behind `queued_here` would miss the latency budget here."""
        return (queued_here + 1) * self._per_event_s / self.workers > self.budget_s

    def admit(self, queued_here: int, under_pressure: bool = False, queued_cloud: int = 0) -> Where:
        """The lane a new event joins, given the events already queued here and in the cloud lane."""
        if self.policy == "always":
            return "cloud"
        if self.policy != "on-overload":
            return "local"
        if under_pressure:
            return "cloud"
        if not self.overloaded(queued_here):
            return "local"
        here_s = (queued_here + 1) * self._per_event_s / self.workers
        cloud_s = (queued_cloud + 1) * self._cloud_per_event_s / self.cloud_workers
        return "cloud" if cloud_s <= here_s else "local"
