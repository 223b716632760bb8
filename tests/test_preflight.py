"""edgefn.preflight: what a device is told before anything is installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from edgefn import preflight
from edgefn.preflight import Facts, check, facts_here, report

ROOT = Path(__file__).resolve().parent.parent
DEVICES = Path(__file__).parent / "devices"
PI_OS_64 = Facts(machine="aarch64", pointer_bits=64, python=(3, 11, 2), glibc=(2, 36), tegra_release=None)


def failed(facts: Facts) -> dict[str, str]:
    return {f.name: f.detail for f in check(facts) if not f.ok}


def test_preflight_passes_64_bit_pi_os():
    assert failed(PI_OS_64) == {}
    assert report(check(PI_OS_64))[-1] == "edgefn can run here."


def test_preflight_refuses_a_32_bit_userland_under_a_64_bit_kernel():
    # 32-bit Raspberry Pi OS on a Pi 4 or 5 boots a 64-bit kernel: uname says aarch64, Python is 32-bit.
    refused = failed(PI_OS_64._replace(machine="aarch64", pointer_bits=32))
    assert list(refused) == ["64-bit userland"]
    assert "64-bit Raspberry Pi OS" in refused["64-bit userland"]
    assert "armv7l" in failed(PI_OS_64._replace(machine="armv7l", pointer_bits=32))["64-bit userland"]


def test_preflight_refuses_another_64_bit_machine():
    assert "riscv64 is not supported" in failed(PI_OS_64._replace(machine="riscv64"))["64-bit userland"]


def test_preflight_refuses_python_before_3_10():
    assert "3.8.10 is too old" in failed(PI_OS_64._replace(python=(3, 8, 10)))["Python"]
    assert failed(PI_OS_64._replace(python=(3, 10, 12))) == {}  # JetPack 6's


def test_preflight_refuses_old_glibc_and_musl():
    assert "glibc 2.31 is too old" in failed(PI_OS_64._replace(glibc=(2, 31)))["glibc"]
    assert "musl" in failed(PI_OS_64._replace(glibc=None))["glibc"]
    assert failed(PI_OS_64._replace(glibc=(2, 35))) == {}  # Ubuntu 22.04's


def test_preflight_refuses_jetpack_4_and_5_and_takes_6():
    nano = facts_here(str(DEVICES / "jetson-nano"))._replace(python=(3, 10, 12))
    assert "JetPack 4 (L4T R32) is not supported" in failed(nano)["JetPack"]
    jetpack5 = PI_OS_64._replace(tegra_release="# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref")
    assert "JetPack 5 (L4T R35) is not supported" in failed(jetpack5)["JetPack"]
    orin = facts_here(str(DEVICES / "jetson-orin-nano"))._replace(python=(3, 10, 12))
    assert failed(orin) == {}
    assert [f.detail for f in check(orin) if f.name == "JetPack"] == ["JetPack 6 (L4T R36)"]


def test_preflight_runs_here_and_says_so():
    done = subprocess.run([sys.executable, "-m", "edgefn.preflight"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "edgefn can run here."


def test_preflight_exit_status_on_a_jetson_nano():
    done = subprocess.run([sys.executable, "-m", "edgefn.preflight", "--device-root", str(DEVICES / "jetson-nano")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "edgefn cannot run here: JetPack."


def test_preflight_reads_as_python_3_6_and_imports_only_the_standard_library():
    # An old system must be told why, not shown a SyntaxError or an ImportError.
    source = Path(preflight.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 6))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert not any(isinstance(node, ast.ImportFrom) and node.module == "__future__" for node in ast.walk(tree))
    package_init = ast.parse((ROOT / "edgefn" / "__init__.py").read_text(), feature_version=(3, 6))
    assert not any(isinstance(node, ast.Import | ast.ImportFrom) for node in ast.walk(package_init))
