"""edgefn_guest's tensor tools: pure Python, checked here against numpy, and in a real component."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from edgefn.events import Event
from edgefn.functions.build import GUEST_DIR, build
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import load_manifest
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from tests.conftest import GUESTS, MODELS

sys.path.insert(0, str(GUEST_DIR))  # the module the guest imports, imported here as plain Python
import edgefn_tensors as tt  # noqa: E402


@pytest.mark.parametrize(("dtype", "items"), [("float32", [0.5, -1.25, 3e4]), ("uint8", [0, 7, 255]),
                                             ("int8", [-128, 0, 127]), ("int32", [-(2**31), 5, 2**31 - 1]),
                                             ("int64", [-(2**63), 1, 2**63 - 1])])
def test_pack_is_numpy_little_endian_and_unpack_its_inverse(dtype: str, items: list):
    data = tt.pack(items, dtype)
    assert data == np.array(items, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    assert tt.unpack(data, dtype) == items


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=40))
def test_softmax_argmax_top_k_agree_with_numpy(logits: list[float]):
    x = np.array(logits, dtype=np.float64)
    expected = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    assert np.allclose(tt.softmax(logits), expected)
    assert tt.argmax(logits) == int(np.argmax(x))
    best = tt.top_k(logits, 3)
    assert [v for _, v in best] == sorted(logits, reverse=True)[:3]
    assert all(logits[i] == v for i, v in best)


def test_normalise_and_rescale():
    assert np.allclose(tt.normalise([1.0, 2.0, 3.0]), (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]))
    assert tt.normalise([4.0, 4.0]) == [0.0, 0.0]  # no spread: centred, not divided by zero
    assert tt.normalise([2.0, 4.0], mean=1.0, std=2.0) == [0.5, 1.5]
    assert tt.rescale([0, 128, 255], 0, 255) == [0.0, 128 / 255, 1.0]
    assert tt.rows([1, 2, 3, 4, 5, 6], 3) == [[1, 2, 3], [4, 5, 6]]


def test_resize_bilinear_and_nearest():
    image = [0.0, 10.0, 20.0, 30.0]  # 2x2
    up = tt.resize(image, 2, 2, 4, 4)
    assert len(up) == 16 and up[0] == 0.0 and up[-1] == 30.0 and up[1] == 2.5  # sampled at pixel centres
    assert tt.resize(up, 4, 4, 2, 2) == pytest.approx([3.75, 11.25, 18.75, 26.25])  # each the mean of its 2x2
    assert tt.resize(image, 2, 2, 4, 4, bilinear=False)[:4] == [0.0, 0.0, 10.0, 10.0]
    rgb = [1, 2, 3] * 9  # a 3x3 image of one colour stays that colour
    assert tt.resize(rgb, 3, 3, 2, 2, channels=3) == pytest.approx([1, 2, 3] * 4)
    with pytest.raises(ValueError, match="not a 3x3 image"):
        tt.resize([0.0] * 8, 3, 3, 2, 2)


# --- in a component --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def top3(tmp_path_factory: pytest.TempPathFactory, component_cache: Path) -> Iterator[FunctionSandbox]:
    """tests/guests/top3 (top-3 digits written with the tools), built once for this module."""
    folder = tmp_path_factory.mktemp("fn") / "top3"
    shutil.copytree(GUESTS / "top3", folder)
    build(folder)
    state = StateStore(tmp_path_factory.mktemp("state") / "state.sqlite")
    with Runtime(component_cache) as runtime:
        manifest = load_manifest(folder)
        sandbox = FunctionSandbox(runtime, manifest, folder / "build" / "top3.wasm",
                                  FunctionHost("top3", ModelRegistry([MODELS]), state))
        yield sandbox
        sandbox.close()
    state.close()


@pytest.mark.slow
def test_a_top3_function_written_with_the_tools_builds_and_answers(top3: FunctionSandbox):
    x, y = load_digits(return_X_y=True)
    hits = 0
    for i in range(1500, 1520):
        event = Event(f"e{i}", "sensors/dev1/top3", json.dumps({"pixels": x[i].tolist()}).encode(), time.time() * 1000)
        [message] = top3.handle(event)
        assert message.topic == "results/dev1/top3"
        best = json.loads(message.payload)["top3"]
        assert len(best) == 3 and best[0][1] >= best[1][1] >= best[2][1] and 0 < sum(p for _, p in best) <= 1.0001
        hits += best[0][0] == y[i]
    assert hits >= 17  # the model's accuracy is about 0.91
    [timed] = top3.handle(Event("bench", "sensors/dev1/top3", b"bench", time.time() * 1000))
    costs = json.loads(timed.payload)
    print(f"guest pre/post-processing per event: tools {costs['tools_us']} µs, by hand {costs['by_hand_us']} µs")
    assert costs["tools_us"] < 3 * costs["by_hand_us"] + 20  # no worse than a small constant
