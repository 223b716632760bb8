"""The shipped models: their metadata is true, the digits build script rebuilds from scratch, and the
registry picks the variant to run, says why it passed over the others, and gives clear errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.config import load_settings
from edgefn.errors import ModelError
from edgefn.inference.choice import Choice
from edgefn.inference.registry import ModelRegistry
from edgefn.observe.metrics import Metrics
from tests.conftest import MODELS

runner = CliRunner()

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


# --- variants: which one runs, and why ------------------------------------------------------------


def test_a_latency_measured_here_chooses_the_variant_and_says_why(tmp_path: Path):
    # By precision alone digits ran as int8 ONNX, the slowest of its variants on this kind of CPU.
    latency = tmp_path / "latency.json"
    assert ModelRegistry([MODELS], latency_file=latency).choice("digits").variant == "int8"  # none recorded
    result = runner.invoke(app, ["model", "bench", "digits", "--models", str(MODELS), "--state-dir", str(tmp_path),
                                 "--variant", "int8", "--variant", "tflite-fp32", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    medians = {v["variant"]: v["latency"][0]["median_ms"] for v in doc["variants"]}
    fastest = min(medians, key=medians.__getitem__)
    assert doc["fastest"] == fastest and doc["in_use"] == fastest and doc["was_in_use"] == "int8"
    choice = ModelRegistry([MODELS], latency_file=latency).choice("digits")
    assert choice.variant == fastest
    slower = "int8" if fastest == "tflite-fp32" else "tflite-fp32"
    reasons = dict(choice.passed_over)
    assert "slower here" in reasons[slower] and "edgefn model bench" in reasons[slower]
    assert "not measured here" in reasons["fp32"]
    # A pin still wins; a record of a file that changed since counts for nothing.
    assert ModelRegistry([MODELS], latency_file=latency, variants={"digits": "int8"}).choice("digits").variant == "int8"
    doc = json.loads(latency.read_text())
    doc["digits"][fastest]["sha256"] = "0" * 64
    doc["digits"][slower]["sha256"] = "0" * 64
    latency.write_text(json.dumps(doc))
    assert ModelRegistry([MODELS], latency_file=latency).choice("digits").variant == "int8"


def test_bench_marks_the_variant_in_use_and_the_fastest(tmp_path: Path):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["model", "bench", "digits", "--models", str(MODELS),
                                                            "--state-dir", str(tmp_path), "--no-record"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "latency.json").exists()
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "in use" in rows["int8"]
    fastest = next(name for name, line in rows.items() if line.rstrip().endswith("fastest"))
    assert f"fastest here: {fastest}" in result.output
    if fastest != "int8":
        assert f"--model-variant digits={fastest}" in result.output


def model_folder(root: Path, variants: list[dict], files: dict[str, bytes] | None = None) -> Path:
    """A digits folder with these model.json variants; each file is the shipped model.onnx unless
    `files` gives its bytes. Only the variant that is opened needs to be a real model of its format."""
    folder = root / "digits"
    folder.mkdir()
    meta = json.loads((DIGITS / "model.json").read_text())
    onnx_bytes = (DIGITS / "model.onnx").read_bytes()
    entries = []
    for v in variants:
        content = (files or {}).get(v["name"], onnx_bytes)
        (folder / v["file"]).write_bytes(content)
        entries.append({"sparsity": 0.0, "accuracy": 0.9, "size": len(content),
                        "sha256": hashlib.sha256(content).hexdigest(), "made_by": "tests", **v})
    meta["variants"] = entries
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def variant(name: str, fmt: str = "onnx", precision: str = "fp32", **extra: object) -> dict:
    return {"name": name, "file": f"{name}.{fmt}", "format": fmt, "precision": precision, **extra}


FOUR = [variant("fp32"), variant("pruned50-int8", precision="int8", sparsity=0.5),
        variant("tflite-int8", "tflite", "int8"), variant("int8", precision="int8")]


def test_registry_prefers_int8_then_dense_then_onnx(tmp_path: Path):
    model_folder(tmp_path, FOUR)
    choice = ModelRegistry([tmp_path]).choice("digits")
    assert choice == Choice("digits", "int8", "onnx", "cpu", (
        ("tflite-int8", "ranked below int8: onnx before tflite"),
        ("pruned50-int8", "ranked below int8: dense before pruned"),
        ("fp32", "ranked below int8: int8 before fp32"),
    ))


def test_registry_prefers_the_more_accurate_of_equals(tmp_path: Path):
    model_folder(tmp_path, [variant("a", precision="int8", accuracy=0.90), variant("b", precision="int8", accuracy=0.91)])
    choice = ModelRegistry([tmp_path]).choice("digits")
    assert (choice.variant, choice.passed_over) == ("b", (("a", "ranked below b: higher accuracy first (0.91 > 0.9)"),))


def test_registry_passes_over_what_cannot_run_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # as if LiteRT were not installed
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    folder = model_folder(tmp_path, [variant("fp32"), variant("int8", precision="int8"),
                                     variant("tflite-int8", "tflite", "int8"), variant("trt", "tensorrt", "int8"),
                                     variant("gone", precision="int8", sparsity=0.5)])
    (folder / "int8.onnx").write_bytes((DIGITS / "model.onnx").read_bytes()[:500])
    (folder / "gone.onnx").unlink()
    choice = ModelRegistry([tmp_path]).choice("digits")
    assert choice.variant == "fp32"
    reasons = dict(choice.passed_over)
    assert list(reasons) == ["int8", "tflite-int8", "trt", "gone"]
    assert reasons["int8"].endswith("int8.onnx: sha256 does not match model.json (truncated or changed since it "
                                    "was recorded)")
    assert reasons["tflite-int8"] == "LiteRT is not installed (pip install ai-edge-litert)"
    assert reasons["trt"] == "format 'tensorrt' has no backend here (known: onnx, tflite)"
    assert reasons["gone"].endswith("gone.onnx: file missing")


def test_registry_with_nothing_runnable_says_why_for_each(tmp_path: Path):
    folder = model_folder(tmp_path, [variant("fp32"), variant("int8", precision="int8")])
    for name in ("fp32.onnx", "int8.onnx"):
        (folder / name).write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"model digits: no variant can run here: int8: .*sha256.*; fp32: .*sha256"):
        ModelRegistry([tmp_path]).get("digits")


def test_registry_pin_wins(tmp_path: Path):
    model_folder(tmp_path, FOUR)
    choice = ModelRegistry([tmp_path], variants={"digits": "fp32"}).choice("digits")
    assert (choice.variant, choice.format) == ("fp32", "onnx")
    assert dict(choice.passed_over) == {v["name"]: "not pinned (pinned: fp32)" for v in FOUR[1:]}


def test_registry_refuses_a_bad_pin(tmp_path: Path):
    folder = model_folder(tmp_path, [variant("fp32"), variant("int8", precision="int8")])
    with pytest.raises(ModelError, match=r"model digits has no variant 'int4' \(it has: fp32, int8\)"):
        ModelRegistry([tmp_path], variants={"digits": "int4"})
    with pytest.raises(ModelError, match="no model named 'nope'"):
        ModelRegistry([tmp_path], variants={"nope": "fp32"})
    (folder / "int8.onnx").write_bytes(b"truncated")
    registry = ModelRegistry([tmp_path], variants={"digits": "int8"})
    with pytest.raises(ModelError, match="model digits: pinned variant int8 cannot run here: .*sha256"):
        registry.get("digits")  # a pin is a demand: no quiet fallback to fp32


def test_registry_reports_each_load_once_to_on_load_and_the_metrics(tmp_path: Path):
    model_folder(tmp_path, FOUR)
    metrics, seen = Metrics(), []

    def on_load(choice: Choice) -> None:
        seen.append(choice)
        metrics.set_model_variant(choice.model, choice.variant, choice.format, choice.delegate)

    registry = ModelRegistry([tmp_path], on_load=on_load)
    x = load_digits(return_X_y=True)[0][1400:1402].astype(np.float32)
    for _ in range(3):
        registry.infer("digits", [("float32", [2, 64], x.tobytes())])
    assert [c.variant for c in seen] == ["int8"] and registry.choice("digits") is seen[0]
    assert ('edgefn_model_variant_info{delegate="cpu",format="onnx",model="digits",variant="int8"} 1.0'
            in metrics.render().decode())


def test_registry_names_an_unknown_op(tmp_path: Path):
    model = onnx.load(DIGITS / "model.onnx")
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "NotAnOp"
    model_folder(tmp_path, [variant("fp32")], files={"fp32": model.SerializeToString()})
    with pytest.raises(ModelError, match=r"fp32.onnx: onnxruntime cannot load it: .*NotAnOp"):
        ModelRegistry([tmp_path]).get("digits")


def test_registry_refuses_a_file_without_the_outputs_model_json_names(tmp_path: Path):
    folder = model_folder(tmp_path, [variant("fp32")])
    meta = json.loads((folder / "model.json").read_text())
    meta["outputs"][0]["name"] = "labels"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"model.json names outputs \['labels'\] but the file has \['label', "):
        ModelRegistry([tmp_path]).get("digits")


@pytest.mark.parametrize(("tensors", "message"), [
    ([("float32", [1, 32], b"\x00" * 128)], "input 'pixels' must be float32 [N, 64], got float32 [1, 32]"),
    ([("int32", [1, 64], b"\x00" * 256)], "input 'pixels' must be float32 [N, 64], got int32 [1, 64]"),
    ([("float32", [64], b"\x00" * 256)], "input 'pixels' must be float32 [N, 64], got float32 [64]"),
    ([("float32", [1, 64], b"\x00" * 256)] * 2, "model digits takes 1 input(s) (pixels), got 2"),
], ids=["shape", "dtype", "rank", "count"])
def test_registry_says_what_the_caller_got_wrong(tensors: list, message: str):
    with pytest.raises(ModelError) as caught:
        ModelRegistry([MODELS]).infer("digits", tensors)
    assert message in str(caught.value)


def test_run_refuses_a_malformed_model_variant():
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["run", "--model-variant", "digits"])
    assert result.exit_code == 2
    assert "'digits' is not NAME=VALUE" in result.output


def test_settings_take_model_variants_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch):
    assert load_settings().model_variants == {}
    monkeypatch.setenv("EDGEFN_MODEL_VARIANTS", '{"digits": "fp32"}')
    assert load_settings().model_variants == {"digits": "fp32"}
    assert load_settings(model_variants={"digits": "int8"}).model_variants == {"digits": "int8"}


def test_run_refuses_a_malformed_cloud_model_mapping():
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["run", "--cloud-model", "digits:digits-cnn"])
    assert result.exit_code == 2
    assert "'digits:digits-cnn' is not NAME=VALUE" in result.output
