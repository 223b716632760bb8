"""Rate-limited log lines: one per interval, with a count of what was skipped."""

from __future__ import annotations

from edgefn.observe.logs import Every


def test_a_line_is_due_once_per_interval_and_counts_what_was_skipped():
    gate = Every(3600)
    assert gate.due() == 0
    assert [gate.due() for _ in range(5)] == [None] * 5
    gate._next = 0.0  # the interval has passed
    assert gate.due() == 5
    assert gate.due() is None
