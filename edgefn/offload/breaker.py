"""A circuit breaker for the cloud endpoint: when it fails, stop calling it for a while and run work here.

    closed ──(N consecutive failures, or a failure rate over the window)──> open
    open ──(cool-down elapsed)──> half-open: up to `trial_calls` calls let through at once
    half-open ──(a trial succeeds)──> closed          half-open ──(a trial fails)──> open
    closed or half-open ──(a call refused: 401/403)──> open for `refused_cooldown_s`, doubling while it
    keeps refusing, up to `max_refused_cooldown_s`

A refusal opens it at once and for long: the endpoint answers, but not us (a wrong or expired token),
and asking again on every batch only repeats the refusal, so one trial a minute (then rarer) is enough.

A caller asks for a `Permit` before each call (None: the breaker is open, do not call) and tells the
permit how the call went. Outcomes of calls let through before the state last changed are ignored, so a
slow call that fails after the breaker opened does not extend the cool-down, and one that succeeds does
not close it. Thread-safe; the clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class BreakerStats:
    """What the breaker knows now, for metrics and /healthz."""

    state: BreakerState
    consecutive_failures: int
    window_calls: int
    window_failures: int
    opened_total: int  # how many times it has opened
    reason: str | None = None  # why it is open or half-open: "failing", or "refused" (401/403)
    retry_in_s: float | None = None  # while open: seconds until a trial call is let through


class Permit:
    """Leave to make one call; report its outcome once (later reports are ignored)."""

    __slots__ = ("_breaker", "_generation", "_done")

    def __init__(self, breaker: CircuitBreaker, generation: int):
        self._breaker, self._generation, self._done = breaker, generation, False

    def succeeded(self) -> None:
        self._report(True)

    def failed(self) -> None:
        self._report(False)

    def refused(self) -> None:
        """The endpoint answered, and refused us (401/403): open for the long back-off."""
        if not self._done:
            self._done = True
            self._breaker._refuse(self._generation)

    def _report(self, ok: bool) -> None:
        if not self._done:
            self._done = True
            self._breaker._record(self._generation, ok)


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures, or when at least `min_calls` calls in the last
    `window_s` seconds failed at `failure_rate` or more; lets `trial_calls` through after `cooldown_s`.

    A refused call opens it for `refused_cooldown_s`, twice that after the next refused trial, and so on up
    to `max_refused_cooldown_s`; a call that goes through resets it.

    `on_change(old, new)` is called after each change of state, outside the lock."""

    def __init__(self, *, failure_threshold: int = 5, failure_rate: float = 0.5, min_calls: int = 20,
                 window_s: float = 30.0, cooldown_s: float = 10.0, trial_calls: int = 1,
                 refused_cooldown_s: float = 60.0, max_refused_cooldown_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState, BreakerState], None] | None = None):
        if failure_threshold < 1 or min_calls < 1 or trial_calls < 1:
            raise ValueError("failure_threshold, min_calls and trial_calls must be at least 1")
        if not 0 < failure_rate <= 1 or window_s <= 0 or cooldown_s < 0:
            raise ValueError("failure_rate must be in (0, 1], window_s positive, cooldown_s not negative")
        if not 0 <= refused_cooldown_s <= max_refused_cooldown_s:
            raise ValueError("refused_cooldown_s must be between 0 and max_refused_cooldown_s")
        self.failure_threshold, self.failure_rate, self.min_calls = failure_threshold, failure_rate, min_calls
        self.window_s, self.cooldown_s, self.trial_calls = window_s, cooldown_s, trial_calls
        self.refused_cooldown_s, self.max_refused_cooldown_s = refused_cooldown_s, max_refused_cooldown_s
        self._clock, self._on_change = clock, on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._generation = 0  # bumped at every change of state
        self._opened_at = 0.0
        self._open_for = cooldown_s  # this opening's cool-down
        self._reason: str | None = None
        self._refusals = 0  # refused calls in a row: each doubles the next cool-down
        self._opened_total = 0
        self._consecutive = 0
        self._trials = 0  # trial calls out now (half-open)
        # The window in ten buckets of [start, calls, failures], so memory stays small at any call rate.
        self._bucket_s = window_s / 10
        self._buckets: deque[list] = deque()

    @property
    def state(self) -> BreakerState:
        with self._lock:
            change = self._cool_down()
            state = self._state
        self._notify(change)
        return state

    def stats(self) -> BreakerStats:
        with self._lock:
            change = self._cool_down()
            calls, failures = self._window()
            retry_in = (max(0.0, self._opened_at + self._open_for - self._clock())
                        if self._state is BreakerState.OPEN else None)
            stats = BreakerStats(self._state, self._consecutive, calls, failures, self._opened_total,
                                 self._reason, retry_in)
        self._notify(change)
        return stats

    def acquire(self) -> Permit | None:
        """A permit for one call, or None while the breaker is open (or every trial call is out)."""
        with self._lock:
            change = self._cool_down()
            if self._state is BreakerState.CLOSED:
                permit: Permit | None = Permit(self, self._generation)
            elif self._state is BreakerState.HALF_OPEN and self._trials < self.trial_calls:
                self._trials += 1
                permit = Permit(self, self._generation)
            else:
                permit = None
        self._notify(change)
        return permit

    def _record(self, generation: int, ok: bool) -> None:
        with self._lock:
            change = None
            if generation == self._generation:  # else: let through before the last change; stale
                if self._state is BreakerState.HALF_OPEN:  # the trial decides (_move resets the trials)
                    change = self._move(BreakerState.CLOSED if ok else BreakerState.OPEN)
                elif self._state is BreakerState.CLOSED:
                    change = self._count(ok)
        self._notify(change)

    def _refuse(self, generation: int) -> None:
        with self._lock:
            change = None
            if generation == self._generation and self._state is not BreakerState.OPEN:
                self._refusals += 1
                change = self._move(BreakerState.OPEN, "refused", min(
                    self.max_refused_cooldown_s, self.refused_cooldown_s * 2 ** (self._refusals - 1)))
        self._notify(change)

    def _count(self, ok: bool) -> tuple[BreakerState, BreakerState] | None:
        now = self._clock()
        self._consecutive = 0 if ok else self._consecutive + 1
        if not self._buckets or now - self._buckets[-1][0] >= self._bucket_s:
            self._buckets.append([now, 0, 0])
        self._buckets[-1][1] += 1
        self._buckets[-1][2] += not ok
        calls, failures = self._window()
        if self._consecutive >= self.failure_threshold or (
                calls >= self.min_calls and failures >= self.failure_rate * calls):
            return self._move(BreakerState.OPEN)
        return None

    def _window(self) -> tuple[int, int]:
        horizon = self._clock() - self.window_s
        while self._buckets and self._buckets[0][0] + self._bucket_s <= horizon:
            self._buckets.popleft()
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def _cool_down(self) -> tuple[BreakerState, BreakerState] | None:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_for:
            return self._move(BreakerState.HALF_OPEN, self._reason)
        return None

    def _move(self, new: BreakerState, reason: str = "failing",
              open_for: float | None = None) -> tuple[BreakerState, BreakerState]:
        old, self._state = self._state, new
        self._generation += 1
        self._trials = 0
        self._reason = reason
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
            self._open_for = self.cooldown_s if open_for is None else open_for
            self._opened_total += 1
            if reason != "refused":
                self._refusals = 0
        elif new is BreakerState.CLOSED:
            self._consecutive = 0
            self._refusals = 0
            self._reason = None
            self._buckets.clear()
        return old, new

    def _notify(self, change: tuple[BreakerState, BreakerState] | None) -> None:
        if change is not None and self._on_change is not None:
            self._on_change(*change)
