"""The circuit breaker's state machine, on a fake clock: closed -> open -> half-open -> closed or open."""

from __future__ import annotations

import threading

import pytest

from edgefn.offload.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def calls(breaker: CircuitBreaker, ok: bool, times: int) -> None:
    for _ in range(times):
        permit = breaker.acquire()
        assert permit is not None
        permit.succeeded() if ok else permit.failed()


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    calls(breaker, False, times)


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    calls(breaker, True, times)


def test_breaker_opens_after_consecutive_failures(clock: FakeClock):
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    fail(breaker, 2)
    succeed(breaker)  # a success resets the run of failures
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.acquire() is None
    assert breaker.stats().opened_total == 1


def test_breaker_opens_on_failure_rate_over_the_window(clock: FakeClock):
    breaker = CircuitBreaker(failure_threshold=100, failure_rate=0.5, min_calls=10, window_s=10, clock=clock)
    for _ in range(4):  # 8 calls, half failing, never two in a row: below min_calls
        succeed(breaker)
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED  # 9 calls, 4 failed
    fail(breaker)  # 10 calls, 5 failed: 50 %
    assert breaker.state is BreakerState.OPEN


def test_breaker_window_forgets_old_calls(clock: FakeClock):
    breaker = CircuitBreaker(failure_threshold=100, failure_rate=0.5, min_calls=4, window_s=10, clock=clock)
    fail(breaker, 3)
    clock.advance(11)  # those three fall out of the window
    succeed(breaker, 2)
    fail(breaker)
    stats = breaker.stats()
    assert (stats.window_calls, stats.window_failures) == (3, 1)
    assert stats.state is BreakerState.CLOSED


def test_breaker_half_open_after_cooldown_then_closes_on_success(clock: FakeClock):
    changes = []
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock,
                             on_change=lambda old, new: changes.append((old.value, new.value)))
    fail(breaker)
    clock.advance(4.9)
    assert breaker.acquire() is None
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    trial = breaker.acquire()
    assert trial is not None
    assert breaker.acquire() is None  # one trial call at a time
    trial.succeeded()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.stats().consecutive_failures == 0
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_breaker_half_open_failure_opens_again_for_a_full_cooldown(clock: FakeClock):
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    fail(breaker)
    clock.advance(5)
    fail(breaker)  # the trial fails
    assert breaker.state is BreakerState.OPEN
    clock.advance(4)
    assert breaker.acquire() is None
    clock.advance(1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.stats().opened_total == 2


def test_breaker_allows_several_trial_calls(clock: FakeClock):
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1, trial_calls=2, clock=clock)
    fail(breaker)
    clock.advance(1)
    first, second = breaker.acquire(), breaker.acquire()
    assert first is not None and second is not None
    assert breaker.acquire() is None
    second.failed()
    assert breaker.state is BreakerState.OPEN
    first.succeeded()  # let through before the breaker opened again: stale, ignored
    assert breaker.state is BreakerState.OPEN


def test_breaker_ignores_outcomes_of_calls_from_before_a_change(clock: FakeClock):
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=5, clock=clock)
    slow = breaker.acquire()
    fail(breaker, 2)
    assert breaker.state is BreakerState.OPEN
    assert slow is not None
    slow.succeeded()  # a slow call that succeeds late does not close the breaker
    assert breaker.state is BreakerState.OPEN
    clock.advance(5)
    late = breaker.acquire()  # the trial
    assert late is not None
    late.succeeded()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_permit_reports_once(clock: FakeClock):
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)
    permit = breaker.acquire()
    assert permit is not None
    permit.failed()
    permit.failed()
    permit.succeeded()
    assert breaker.stats().consecutive_failures == 1
    assert breaker.stats().window_calls == 1


def test_breaker_is_thread_safe(clock: FakeClock):
    breaker = CircuitBreaker(failure_threshold=10**9, failure_rate=1.0, min_calls=10**9, clock=clock)

    def work() -> None:
        for i in range(2000):
            permit = breaker.acquire()
            assert permit is not None
            permit.failed() if i % 2 else permit.succeeded()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = breaker.stats()
    assert (stats.window_calls, stats.window_failures) == (8000, 4000)


def test_breaker_refuses_nonsense_settings():
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(failure_rate=1.5)


def refuse(breaker: CircuitBreaker) -> None:
    permit = breaker.acquire()
    assert permit is not None
    permit.refused()


def test_breaker_opens_at_the_first_refusal_for_a_minute_doubling_to_ten(clock: FakeClock):
    """A 401/403: the endpoint will refuse every call alike, so one trial a minute, then rarer."""
    breaker = CircuitBreaker(failure_threshold=5, cooldown_s=5, clock=clock)
    refuse(breaker)
    stats = breaker.stats()
    assert (stats.state, stats.reason, stats.retry_in_s) == (BreakerState.OPEN, "refused", 60)
    waits = []
    for _ in range(6):
        opened = clock.now
        while (trial := breaker.acquire()) is None:
            clock.advance(1)
        waits.append(clock.now - opened)
        assert breaker.acquire() is None  # one trial at a time, while the refusal stands
        trial.refused()
    assert waits == [60, 120, 240, 480, 600, 600]


def test_breaker_forgets_refusals_once_a_call_goes_through(clock: FakeClock):
    breaker = CircuitBreaker(cooldown_s=5, refused_cooldown_s=2, max_refused_cooldown_s=8, clock=clock)
    refuse(breaker)
    clock.advance(2)
    refuse(breaker)  # the trial: now 4 s
    clock.advance(4)
    succeed(breaker)  # the trial goes through: closed, and the next refusal waits 2 s again
    assert (breaker.state, breaker.stats().reason) == (BreakerState.CLOSED, None)
    refuse(breaker)
    assert breaker.stats().retry_in_s == 2
    with pytest.raises(ValueError):
        CircuitBreaker(refused_cooldown_s=10, max_refused_cooldown_s=5)
