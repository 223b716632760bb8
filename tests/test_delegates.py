"""Delegate chains: each step that is missing or fails is passed over with its reason, the first
that works runs the model.

What cannot run here stands in behind the interface the real one uses: an Edge TPU / NPU delegate
is a real shared library built from tests/fakes/fake_delegate.c and loaded through LiteRT's own
`load_delegate` (it claims no op, so the CPU computes); a GPU build of onnxruntime is the real
onnxruntime with the provider list such a build reports, whose TensorRT provider falls back to the
CPU as a real one does when its libraries are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as real_ort
import pytest

from edgefn.errors import ModelError
from edgefn.inference import delegates
from edgefn.inference.delegates import LITERT_CPU, ONNX_CPU, XNNPACK, Delegate, chains_from_profile
from edgefn.inference.registry import ModelRegistry
from edgefn.profiles.schema import get_profile
from tests.conftest import MODELS

FAKES = Path(__file__).parent / "fakes"
EDGETPU = Delegate("edgetpu", "tflite", library="libedgetpu.so.1", requires_variant="tflite-edgetpu")
CORAL = {"onnx": (ONNX_CPU,), "tflite": (EDGETPU, XNNPACK, LITERT_CPU)}
TENSORRT = Delegate("tensorrt", "onnx", provider="TensorrtExecutionProvider", options={"trt_fp16_enable": "True"})
CUDA = Delegate("cuda", "onnx", provider="CUDAExecutionProvider")
JETSON = {"onnx": (TENSORRT, CUDA, ONNX_CPU), "tflite": (XNNPACK,)}


@pytest.fixture(scope="session")
def delegate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the fake delegate under the Edge TPU runtime's file name."""
    out = tmp_path_factory.mktemp("delegates")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out / "libedgetpu.so.1"),
                    str(FAKES / "fake_delegate.c")], check=True)
    return out


@pytest.fixture()
def coral_model(tmp_path: Path) -> Path:
    """digits with a `tflite-edgetpu` variant (what edgetpu_compiler makes; here the int8 file itself)."""
    folder = tmp_path / "models" / "digits"
    shutil.copytree(MODELS / "digits", folder)
    meta = json.loads((folder / "model.json").read_text())
    int8 = next(v for v in meta["variants"] if v["name"] == "tflite-int8")
    shutil.copy(folder / int8["file"], folder / "model_edgetpu.tflite")
    meta["variants"].append({**int8, "name": "tflite-edgetpu", "file": "model_edgetpu.tflite"})
    (folder / "model.json").write_text(json.dumps(meta))
    return folder.parent


def labels(registry: ModelRegistry, x: np.ndarray) -> np.ndarray:
    return np.frombuffer(registry.infer("digits", [("float32", list(x.shape), x.tobytes())])[0][2], dtype="<i8")


def held_out() -> np.ndarray:
    return np.load(MODELS / "digits" / "validation.npz")["x"].astype(np.float32)


def test_the_edge_tpu_delegate_runs_its_own_variant(coral_model: Path, delegate_dir: Path):
    registry = ModelRegistry([coral_model], chains=CORAL, search=[delegate_dir])
    choice = registry.choice("digits")
    assert (choice.variant, choice.format, choice.delegate) == ("tflite-edgetpu", "tflite", "edgetpu")
    x = held_out()
    reference = labels(ModelRegistry([MODELS], variants={"digits": "fp32"}), x)
    assert (labels(registry, x) == reference).mean() >= 0.99


def test_a_missing_delegate_library_is_passed_over_with_the_loaders_reason(coral_model: Path, tmp_path: Path):
    choice = ModelRegistry([coral_model], chains=CORAL, search=[tmp_path]).choice("digits")
    assert (choice.variant, choice.delegate) == ("int8", "cpu")  # the CPU's first choice, int8 ONNX
    reasons = dict(choice.passed_over)
    assert reasons["tflite-edgetpu@edgetpu"].startswith("delegate library libedgetpu.so.1 did not load: ")
    assert "cannot open shared object file" in reasons["tflite-edgetpu@edgetpu"]


def test_a_delegate_that_fails_to_initialise_is_passed_over(coral_model: Path, delegate_dir: Path):
    failing = Delegate("edgetpu", "tflite", library="libedgetpu.so.1", requires_variant="tflite-edgetpu",
                       options={"fail": "1"})  # the library loads; creating the delegate fails (no device)
    chains = {"onnx": (), "tflite": (failing, XNNPACK)}
    choice = ModelRegistry([coral_model], chains=chains, search=[delegate_dir]).choice("digits")
    assert (choice.variant, choice.delegate) == ("tflite-int8", "xnnpack")
    reasons = dict(choice.passed_over)
    assert reasons["tflite-edgetpu@edgetpu"] == "delegate library libedgetpu.so.1 did not load: Failed to load " \
        f"delegate from {delegate_dir / 'libedgetpu.so.1'}"
    assert reasons["int8"] == "the device profile has no delegate for onnx"


def test_a_delegate_for_a_variant_the_model_lacks_says_so(delegate_dir: Path):
    choice = ModelRegistry([MODELS], chains=CORAL, search=[delegate_dir]).choice("digits")
    assert choice.delegate == "cpu"
    assert dict(choice.passed_over)["tflite-edgetpu@edgetpu"] == (
        "edgetpu runs only a tflite-edgetpu variant, and model digits has none")


def test_litert_reference_kernels_run_without_xnnpack():
    chains = {"onnx": (), "tflite": (LITERT_CPU,)}
    registry = ModelRegistry([MODELS], chains=chains, variants={"digits": "tflite-int8"})
    assert registry.choice("digits").delegate == "cpu"
    x = held_out()
    assert (labels(registry, x) == labels(ModelRegistry([MODELS], variants={"digits": "tflite-int8"}), x)).all()


def test_a_provider_missing_from_this_onnxruntime_build_is_passed_over():
    choice = ModelRegistry([MODELS], chains=JETSON, precisions=["fp32", "int8"]).choice("digits")
    assert (choice.variant, choice.delegate) == ("fp32", "cpu")
    reasons = dict(choice.passed_over)
    assert reasons["fp32@tensorrt"].startswith("TensorrtExecutionProvider is not in this onnxruntime build (it has: ")
    assert reasons["fp32@cuda"].startswith("CUDAExecutionProvider is not in this onnxruntime build")


class GpuOnnxruntime(SimpleNamespace):
    """onnxruntime as a Jetson's GPU build presents itself: TensorRT and CUDA providers listed; the
    TensorRT one falls back to the CPU (its libraries missing), as the real one does; CUDA starts.
    The arithmetic is the real CPU provider's."""

    def __init__(self) -> None:
        super().__init__(SessionOptions=real_ort.SessionOptions, InferenceSession=self.session)
        self.asked: list[list] = []

    @staticmethod
    def get_available_providers() -> list[str]:
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    def session(self, source: object, options: object, providers: list) -> object:
        self.asked.append(providers)
        first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        real = real_ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        reported = ["CPUExecutionProvider"] if first == "TensorrtExecutionProvider" else [first, "CPUExecutionProvider"]
        real.get_providers = lambda: reported
        return real


def test_the_chain_walks_to_the_first_provider_that_starts(monkeypatch: pytest.MonkeyPatch):
    gpu = GpuOnnxruntime()
    monkeypatch.setattr(delegates, "onnxruntime", lambda: gpu)
    choice = ModelRegistry([MODELS], chains=JETSON, precisions=["fp32", "int8"]).choice("digits")
    assert (choice.variant, choice.format, choice.delegate) == ("fp32", "onnx", "cuda")
    assert choice.passed_over[0] == ("fp32@tensorrt", "TensorrtExecutionProvider failed to initialise "
                                                      "(onnxruntime fell back to CPUExecutionProvider)")
    assert gpu.asked[0] == [("TensorrtExecutionProvider", {"trt_fp16_enable": "True"}), "CPUExecutionProvider"]
    assert gpu.asked[1] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_nothing_that_runs_names_every_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    chains = {"onnx": (CUDA,), "tflite": (EDGETPU,)}
    with pytest.raises(ModelError, match=r"no variant can run here: .*CUDAExecutionProvider is not in this"):
        ModelRegistry([MODELS], chains=chains, search=[tmp_path]).get("digits")


def _jetson_registry(tmp_path: Path) -> ModelRegistry:
    """The digits model as the shipped Jetson Orin Nano profile would load it."""
    profile = get_profile("jetson-orin-nano")
    return ModelRegistry([MODELS], chains=chains_from_profile(profile, tmp_path), precisions=profile.variant_preference,
                         cpu_precisions=profile.cpu_variant_preference)


def test_a_jetson_without_the_gpu_build_runs_int8_on_the_cpu(tmp_path: Path):
    # The package index's onnxruntime (the one installed here) has no CUDA or TensorRT provider: the
    # GPU's fp32-first order must not make the Cortex-A cores run fp32.
    choice = _jetson_registry(tmp_path).choice("digits")
    assert (choice.variant, choice.format, choice.delegate) == ("int8", "onnx", "cpu")
    reasons = dict(choice.passed_over)
    assert reasons["fp32@tensorrt"].startswith("TensorrtExecutionProvider is not in this onnxruntime build")


def test_a_jetson_with_the_gpu_build_keeps_the_gpus_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(delegates, "onnxruntime", lambda: GpuOnnxruntime())
    choice = _jetson_registry(tmp_path).choice("digits")
    assert (choice.variant, choice.delegate) == ("fp32", "cuda")
