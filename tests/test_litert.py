"""Every shipped variant of every model runs on its backend (onnxruntime or LiteRT) and answers as the
model's fp32 ONNX does; the LiteRT backend batches, serves threads, falls back and fails clearly.

The variants come from each models/*/model.json, so a variant added there is covered here without a
change. LiteRT (ai-edge-litert) is a dependency: where it is missing these tests fail, never skip."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from edgefn.errors import ModelError
from edgefn.inference.backends import open_variant
from edgefn.inference.backends.base import Backend
from edgefn.inference.backends.litert import LiteRtBackend, litert_interpreter
from edgefn.inference.evaluate import Samples, accuracy, predict
from edgefn.inference.model import ModelInfo
from edgefn.inference.registry import ModelRegistry
from tests.conftest import MODELS

FOLDERS = sorted(meta.parent for meta in MODELS.glob("*/model.json"))
SHIPPED = [(folder, v.name) for folder in FOLDERS for v in ModelInfo.read(folder).variants]
TFLITE = [(folder, v.name) for folder in FOLDERS for v in ModelInfo.read(folder).variants if v.format == "tflite"]
# Labels that a dense variant (fp32 in another format, or int8) must share with the fp32 ONNX model, and a
# pruned one (weights zeroed with no fine-tuning: its accuracy bound was checked when it was registered).
AGREE_DENSE = 0.99
AGREE_PRUNED = 0.94


def ids(case: tuple[Path, str]) -> str:
    return f"{case[0].name}/{case[1]}"


def validation(folder: Path) -> Samples:
    return Samples.load(folder / "validation.npz")


def test_litert_is_installed():
    from ai_edge_litert.interpreter import Interpreter

    assert litert_interpreter() is Interpreter


def test_the_shipped_models_cover_both_backends():
    formats = {ModelInfo.read(folder).variant(name).format for folder, name in SHIPPED}
    assert formats == {"onnx", "tflite"}
    for folder in FOLDERS:
        assert "fp32" in ModelInfo.read(folder).variant_names(), folder
        assert validation(folder).y is not None


@pytest.mark.parametrize("case", SHIPPED, ids=ids)
def test_shipped_variant_runs_and_agrees_with_fp32(case: tuple[Path, str]):
    folder, name = case
    info = ModelInfo.read(folder)
    variant, samples = info.variant(name), validation(folder)
    backend = open_variant(info, variant)  # sha256 checked: the file is the one model.json describes
    assert backend.format == variant.format
    labels = predict(backend, samples)
    reference = predict(open_variant(info, info.variant("fp32")), samples)
    agree = float((labels == reference).mean())
    assert agree >= (AGREE_PRUNED if variant.sparsity else AGREE_DENSE), f"{name}: {agree:.4f} agree with fp32"
    assert float((labels == samples.y).mean()) == pytest.approx(variant.accuracy, abs=1.5 / len(samples.y))


def opened(case: tuple[Path, str]) -> tuple[ModelInfo, Backend, np.ndarray]:
    """The model, its variant loaded, and its validation inputs."""
    info = ModelInfo.read(case[0])
    return info, open_variant(info, info.variant(case[1])), validation(case[0]).x


@pytest.mark.parametrize("case", TFLITE, ids=ids)
def test_litert_outputs_follow_model_json_at_any_batch(case: tuple[Path, str]):
    info, backend, x = opened(case)
    assert backend.outputs == [o.name for o in info.outputs]
    whole = backend.run([x])
    for out, spec in zip(whole, info.outputs, strict=True):
        assert out.dtype == np.dtype(spec.dtype) and out.shape[0] == len(x)
    for batch in (1, 16, 3, 1):  # the interpreter is resized up and down between calls
        part = backend.run([x[:batch]])
        assert np.array_equal(part[0], whole[0][:batch])
        np.testing.assert_allclose(part[1], whole[1][:batch], atol=1e-5)


@pytest.mark.parametrize("case", TFLITE, ids=ids)
def test_litert_serves_many_threads(case: tuple[Path, str]):
    _, backend, x = opened(case)
    expected = backend.run([x])[0]
    wrong: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(100):
            start, size = int(rng.integers(0, len(x) - 32)), int(rng.integers(1, 32))
            got = backend.run([x[start:start + size]])[0]
            if not np.array_equal(got, expected[start:start + size]):
                wrong.append(f"thread {seed}: rows {start}..{start + size}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def first_tflite() -> tuple[ModelInfo, str]:
    folder, name = TFLITE[0]
    return ModelInfo.read(folder), name


def test_litert_falls_back_to_tflite_runtime(monkeypatch: pytest.MonkeyPatch):
    from ai_edge_litert.interpreter import Interpreter

    fake = types.ModuleType("tflite_runtime.interpreter")
    fake.Interpreter = Interpreter  # the same class, as tflite-runtime ships it
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    assert litert_interpreter() is Interpreter
    info, name = first_tflite()
    samples = validation(info.folder)
    assert accuracy(open_variant(info, info.variant(name)), samples) == pytest.approx(
        info.variant(name).accuracy, abs=1.5 / len(samples.y))


def test_missing_litert_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    info, name = first_tflite()
    with pytest.raises(ModelError, match=r"^LiteRT is not installed \(pip install ai-edge-litert\)$"):
        open_variant(info, info.variant(name))
    folder = tmp_path / info.folder.name
    shutil.copytree(info.folder, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["variants"] = [v for v in meta["variants"] if v["format"] == "tflite"]
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=f"model {info.name}: no variant can run here: .*LiteRT is not installed"):
        ModelRegistry([tmp_path]).get(info.name)


def test_tflite_numpy2_breakage_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    broken = types.ModuleType("tflite_runtime.interpreter")

    def fail(name: str) -> None:
        raise ImportError("numpy.core.multiarray failed to import")  # tflite-runtime 2.14 under numpy 2

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", broken)
    with pytest.raises(ModelError, match="tflite-runtime cannot be imported .*install ai-edge-litert"):
        litert_interpreter()


def test_truncated_tflite_is_a_clear_error(tmp_path: Path):
    info, name = first_tflite()
    path = tmp_path / "model.tflite"
    path.write_bytes(info.path(info.variant(name)).read_bytes()[:400])
    with pytest.raises(ModelError, match=f"{path}: LiteRT cannot load it: "):
        LiteRtBackend(path)


def test_litert_says_what_the_caller_got_wrong():
    info, name = first_tflite()
    backend = open_variant(info, info.variant(name))
    with pytest.raises(ModelError, match=r"input 'pixels' must be float32 \[N, 64\], got float64 \[2, 64\]"):
        backend.run([np.zeros((2, 64))])
    with pytest.raises(ModelError, match=r"input 'pixels' must be float32 \[N, 64\], got float32 \[2, 63\]"):
        backend.run([np.zeros((2, 63), np.float32)])
