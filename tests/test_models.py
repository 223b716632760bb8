"""The shipped digits model: its metadata is true, and the script rebuilds it from scratch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_digits

from edgefn.errors import ModelError
from edgefn.inference.registry import ModelRegistry
from tests.conftest import MODELS

DIGITS = MODELS / "digits"


def held_out_accuracy(model: Path) -> float:
    x, y = load_digits(return_X_y=True)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {"pixels": x[1400:].astype(np.float32)})[0]
    return float((labels == y[1400:]).mean())


def test_digits_model_metadata_matches_the_file():
    meta = json.loads((DIGITS / "model.json").read_text())
    fp32 = next(v for v in meta["variants"] if v["name"] == "fp32")
    assert fp32["sha256"] == hashlib.sha256((DIGITS / fp32["file"]).read_bytes()).hexdigest()
    assert [i["name"] for i in meta["inputs"]] == ["pixels"]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert fp32["accuracy"] >= 0.90
    assert held_out_accuracy(DIGITS / fp32["file"]) == pytest.approx(fp32["accuracy"], abs=1e-4)


def test_digits_model_rebuilds_from_scratch(tmp_path: Path):
    subprocess.run([sys.executable, str(DIGITS / "build.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["variants"][0]["accuracy"] >= 0.90
    assert held_out_accuracy(tmp_path / "model.onnx") >= 0.90


def test_registry_runs_digits_and_reports_clear_errors(tmp_path: Path):
    registry = ModelRegistry([MODELS])
    x, y = load_digits(return_X_y=True)
    label, probs = registry.infer("digits", [("float32", [1, 64], x[1400].astype(np.float32).tobytes())])
    assert label[0] == "int64" and label[1] == [1]
    assert probs[0] == "float32" and probs[1] == [1, 10]
    with pytest.raises(ModelError, match="no model named 'nope'"):
        registry.infer("nope", [])
    with pytest.raises(ModelError, match="needs 256 bytes"):
        registry.infer("digits", [("float32", [1, 64], b"\x00" * 8)])


def test_registry_refuses_a_tampered_or_truncated_model(tmp_path: Path):
    folder = tmp_path / "digits"
    folder.mkdir()
    meta = json.loads((DIGITS / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(meta))
    (folder / "model.onnx").write_bytes((DIGITS / "model.onnx").read_bytes()[:500])
    with pytest.raises(ModelError, match="sha256"):
        ModelRegistry([tmp_path]).get("digits")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        ModelRegistry([tmp_path], verify=False).get("digits")
