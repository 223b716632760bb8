"""Per-function state: persisted, separated per function, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefn.functions.state import MAX_TOTAL_BYTES, MAX_VALUE_BYTES, StateLimitError, StateStore


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
