"""Per-function state: persisted, separated per function, bounded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgefn.errors import DiskFull
from edgefn.functions.state import MAX_TOTAL_BYTES, MAX_VALUE_BYTES, StateLimitError, StateStore
from tests.conftest import fill


def test_state_persists_per_function_and_empty_value_deletes(tmp_path: Path):
    store = StateStore(tmp_path / "state.sqlite")
    store.set("a", "k", b"1")
    store.set("b", "k", b"2")
    store.set("a", "gone", b"x")
    store.set("a", "gone", b"")
    store.close()
    store = StateStore(tmp_path / "state.sqlite")
    assert (store.get("a", "k"), store.get("b", "k"), store.get("a", "gone")) == (b"1", b"2", None)
    store.close()


def test_state_bounds_key_value_and_total():
    store = StateStore(":memory:")
    with pytest.raises(StateLimitError, match="key"):
        store.set("f", "k" * 300, b"x")
    with pytest.raises(StateLimitError, match="KiB"):
        store.set("f", "k", b"x" * (MAX_VALUE_BYTES + 1))
    chunk = b"x" * MAX_VALUE_BYTES
    n = 0
    with pytest.raises(StateLimitError, match="would pass"):
        for n in range(MAX_TOTAL_BYTES // MAX_VALUE_BYTES + 1):
            store.set("f", f"k{n}", chunk)
    assert n == MAX_TOTAL_BYTES // MAX_VALUE_BYTES - 1  # the one that would pass the total is refused
    store.set("f", "k0", chunk)  # replacing a value within the bound is fine
    store.set("other", "k", chunk)  # the bound is per function


@pytest.mark.parametrize("garbage", [b"not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 5000])
def test_damaged_state_file_is_moved_aside_and_state_starts_empty(tmp_path: Path, garbage: bytes,
                                                                   caplog: pytest.LogCaptureFixture):
    path = tmp_path / "state.sqlite"
    path.write_bytes(garbage)
    store = StateStore(path)
    assert store.get("a", "k") is None and "damaged" in (store.damage or "")
    store.set("a", "k", b"1")
    store.close()
    [aside] = tmp_path.glob("state.sqlite.damaged-*")
    assert aside.read_bytes() == garbage
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "\n" not in error and aside.name in error
    assert StateStore(path).get("a", "k") == b"1"


def test_state_set_on_a_full_disk_is_disk_full_and_changes_nothing(small_disk: Path):
    store = StateStore(small_disk / "state.sqlite")
    store.set("f", "k", b"old")
    fill(small_disk)
    last = b"old"
    with pytest.raises(DiskFull, match="state.sqlite: disk full"):
        for n in range(64):  # the first sets may still fit in pages SQLite holds
            store.set("f", "k", bytes([n]) * MAX_VALUE_BYTES)
            last = bytes([n]) * MAX_VALUE_BYTES
    assert store.get("f", "k") == last
    store.close()
