"""Rate-limited log lines: the first whole, the rest counted."""

from __future__ import annotations

import logging

from edgefn.observe.logs import RateLimited


def test_repeats_are_held_back_and_counted(caplog):
    limited = RateLimited(logging.getLogger("edgefn.test"), every_s=3600)
    with caplog.at_level(logging.WARNING, logger="edgefn.test"):
        for i in range(1000):
            limited.log(logging.WARNING, "disk", "cannot write %d", i)
        limited.log(logging.WARNING, "other", "another kind")
    assert [r.getMessage() for r in caplog.records] == ["cannot write 0", "another kind"]


def test_after_the_interval_one_line_says_how_many_were_held_back(caplog):
    limited = RateLimited(logging.getLogger("edgefn.test"), every_s=0.0)
    limited._every = 3600
    with caplog.at_level(logging.WARNING, logger="edgefn.test"):
        limited.log(logging.WARNING, "disk", "full")
        limited.log(logging.WARNING, "disk", "full")
        limited._every = 0.0
        limited.log(logging.WARNING, "disk", "full")
    assert caplog.records[-1].getMessage().startswith("full (and 1 more like it")


def test_the_traceback_comes_only_the_first_time(caplog):
    limited = RateLimited(logging.getLogger("edgefn.test"), every_s=0.0)
    with caplog.at_level(logging.ERROR, logger="edgefn.test"):
        for _ in range(2):
            try:
                raise OSError("disk full")
            except OSError:
                limited.log(logging.ERROR, "settle", "settle failed", exc_info=True)
    assert caplog.records[0].exc_info is not None and not caplog.records[1].exc_info
    limited.clear("settle")
