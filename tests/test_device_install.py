"""What a device installs: the wheel built from this tree (its files and its requirements as pip reads
them on a device, a Jetson and elsewhere), and the clear errors where something it may lack is missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest
from packaging.requirements import Requirement

from edgefn.errors import ModelError
from edgefn.inference.registry import ModelRegistry
from tests.conftest import MODELS, ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel of this tree, built with setuptools' own PEP 517 hook from a copy of what it packs."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("edgefn", "cloud_sync", "device_profiles"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_wheel(sys.argv[1]))", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    name = done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(out / name) as whl:
        yield whl


def _requires(whl: zipfile.ZipFile) -> list[Requirement]:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    return [Requirement(r) for r in Parser().parsestr(whl.read(meta).decode()).get_all("Requires-Dist")]


def _installed(requires: list[Requirement], extras: tuple[str, ...], kernel: str) -> set[str]:
    """The distributions pip installs for edgefn[extras] on a machine running `kernel`."""
    names = set()
    for req in requires:
        env = {"platform_release": kernel, "python_version": "3.11"}
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            names.add(req.name)
    return names


PI = "6.6.51+rpt-rpi-v8"  # Raspberry Pi OS bookworm
JETSON = "5.15.148-tegra"  # JetPack 6


def test_the_wheel_holds_what_a_device_runs(wheel: zipfile.ZipFile):
    names = set(wheel.namelist())
    for needed in ("edgefn/service/files/edgefn.service", "edgefn/service/files/config.toml",
                   "edgefn/service/files/edgefn.env", "edgefn/functions/wit/world.wit"):
        assert needed in names, f"{needed} is not in the wheel"
    data = [n for n in names if ".data/data/share/edgefn/device_profiles/" in n]
    assert any(n.endswith("jetson-orin-nano.toml") for n in data)


def test_a_plain_install_runs_a_device_and_builds_nothing(wheel: zipfile.ZipFile):
    requires = _requires(wheel)
    on_a_pi = _installed(requires, (), PI)
    assert {"wasmtime", "onnxruntime", "ai-edge-litert", "numpy", "paho-mqtt", "tuf"} <= on_a_pi
    assert "componentize-py" not in on_a_pi  # building functions is for where they are developed
    assert "componentize-py" in _installed(requires, ("build",), PI)


def test_a_jetson_chooses_its_onnxruntime_and_never_gets_both(wheel: zipfile.ZipFile):
    requires = _requires(wheel)
    assert "onnxruntime" not in _installed(requires, (), JETSON)
    gpu = _installed(requires, ("jetson",), JETSON)
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert "onnxruntime" in _installed(requires, ("cpu",), JETSON)
    assert "onnxruntime-gpu" not in _installed(requires, ("jetson",), PI)  # NVIDIA's build is for a Jetson only


def test_without_onnxruntime_a_model_says_how_to_install_it_and_runs_on_litert(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as on a Jetson installed with no extra
    choice = ModelRegistry([MODELS]).choice("digits")
    assert choice.format == "tflite"
    reasons = dict(choice.passed_over)
    assert reasons["int8"].startswith("onnxruntime is not installed: pip install 'edgefn[cpu]'")
    with pytest.raises(ModelError, match=r"pip install 'edgefn\[jetson\]' --extra-index-url"):
        ModelRegistry([MODELS], variants={"digits": "fp32"}).get("digits")
