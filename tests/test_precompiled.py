"""Components compiled ahead for a target (`edgefn fn build --target`), shipped in bundles, mapped by a
device of that target with no compile; a shipped artifact whose stamp does not match is compiled here
instead, never mapped. Staleness of a component by the content of its sources."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import wasmtime
from wasmtime import component as wc

from edgefn.errors import BuildError, BundleError
from edgefn.events import Event
from edgefn.fleet.pack import build_bundle
from edgefn.fleet.unpack import unpack
from edgefn.functions import compile as compiler
from edgefn.functions.build import build, component_path, precompile_targets, why_build
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import load_manifest
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from tests.conftest import MODELS
from tests.test_sandbox import (
    ANSWER_WAT,
    CRASHED,
    STARTING_WAT,
    _answer_in_child,
    _forge,
    _garble_code,
    _lines_naming,
)

HOST = compiler.host_target()
OTHER = "aarch64" if HOST == "x86_64" else "x86_64"


@pytest.fixture()
def answer_wasm(tmp_path: Path) -> Path:
    wasm = tmp_path / "build" / "answer.wasm"
    wasm.parent.mkdir()
    wasm.write_bytes(bytes(wasmtime.wat2wasm(ANSWER_WAT)))
    return wasm


class CompileSpy:
    """Counts the compiles a runtime starts (each would be a child process)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.compiled: list[Path] = []
        real = compiler.compile_in_child

        def counting(wasm: Path, artifact: Path, target: str | None = None) -> None:
            self.compiled.append(Path(wasm))
            real(wasm, artifact, target)

        monkeypatch.setattr(compiler, "compile_in_child", counting)


def _answer(runtime: Runtime, wasm: Path) -> int:
    component = runtime.load(wasm)
    store = wasmtime.Store(runtime.engine)
    store.set_epoch_deadline(1000)
    return wc.Linker(runtime.engine).instantiate(store, component).get_func(store, "answer")(store)


def test_a_shipped_artifact_for_this_target_is_mapped_with_no_compile(answer_wasm: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    assert precompile_targets(answer_wasm, [HOST]) == {HOST: "compiled"}
    assert precompile_targets(answer_wasm, [HOST]) == {HOST: "up to date"}
    stamp = json.loads(compiler.stamp_of(compiler.precompiled(answer_wasm, HOST)).read_text())
    assert stamp["target"] == HOST and stamp["wasmtime"] == compiler.WASMTIME_VERSION
    spy = CompileSpy(monkeypatch)
    with Runtime(tmp_path / "cache") as runtime:
        assert _answer(runtime, answer_wasm) == 42
    assert spy.compiled == [] and not list((tmp_path / "cache").glob("*.cwasm"))


@pytest.mark.parametrize(("change", "reason"), [
    ({"target": OTHER}, f"compiled for {OTHER}, this is {HOST}"),
    ({"wasmtime": "1.0.0"}, f"compiled by wasmtime 1.0.0, this is wasmtime {compiler.WASMTIME_VERSION}"),
    ({"component": "0" * 64}, "compiled from another component"),
    ({"sha256": "0" * 64}, "its bytes do not match its checksum"),
])
def test_a_shipped_artifact_that_does_not_match_is_compiled_here_instead(
        answer_wasm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        change: dict, reason: str):
    precompile_targets(answer_wasm, [HOST])
    stamp_file = compiler.stamp_of(compiler.precompiled(answer_wasm, HOST))
    stamp_file.write_text(json.dumps({**json.loads(stamp_file.read_text()), **change}))
    spy = CompileSpy(monkeypatch)
    with Runtime(tmp_path / "cache") as runtime:
        assert _answer(runtime, answer_wasm) == 42
    assert spy.compiled == [answer_wasm]
    assert f"not used ({reason}); compiling for this CPU instead" in caplog.text
    assert compiler.precompiled(answer_wasm, HOST).exists()  # a bundle's files are never changed


def test_a_shipped_artifact_with_damaged_code_is_never_run(answer_wasm: Path, tmp_path: Path):
    precompile_targets(answer_wasm, [HOST])
    _garble_code(compiler.precompiled(answer_wasm, HOST))
    assert "not used (its bytes do not match its checksum)" in _answer_in_child(tmp_path / "cache", answer_wasm)


def test_a_shipped_artifact_that_crashes_its_loader_is_compiled_here_and_remembered(answer_wasm: Path,
                                                                                     tmp_path: Path):
    wasm = answer_wasm.with_name("starting.wasm")  # its start code runs at load
    wasm.write_bytes(bytes(wasmtime.wat2wasm(STARTING_WAT)))
    precompile_targets(wasm, [HOST])
    shipped = compiler.precompiled(wasm, HOST)
    _forge(shipped)  # as a bundle could ship it: its stamp matches, its code is gone; the old code died of it
    forged, verdicts, written = shipped.read_bytes(), tmp_path / "cache", None
    for _start in ("first", "second"):  # the second reads the verdict: no child tries it again
        [line] = _lines_naming(_answer_in_child(verdicts, wasm), shipped.name)
        assert re.search(rf"not used \({CRASHED}\); compiling for this CPU instead", line), line
        [verdict] = verdicts.glob("*.crashed")
        assert written in (None, verdict.stat().st_mtime_ns), "the second start tried it again"
        written = verdict.stat().st_mtime_ns
    assert shipped.read_bytes() == forged  # a bundle's files are never changed


@pytest.mark.skipif(HOST != "x86_64", reason="the x86_64 wheel of wasmtime is the one known to lack aarch64")
def test_a_target_this_wasmtime_cannot_compile_for_says_so(answer_wasm: Path):
    with pytest.raises(BuildError, match=rf"cannot compile for {OTHER}: compile that target on a {OTHER} machine"):
        precompile_targets(answer_wasm, [OTHER])
    assert not compiler.precompiled(answer_wasm, OTHER).exists()


def test_a_bundle_refuses_a_target_not_compiled_or_stale(digits_fn: Path, tmp_path: Path):
    src = tmp_path / "digits"
    shutil.copytree(digits_fn, src)
    with pytest.raises(BundleError, match=rf"digits\.{OTHER}\.cwasm: not compiled \(run `edgefn fn build --target"):
        build_bundle([src], "digits", "1.0.0", tmp_path / "b.tar", models=[MODELS], targets=[OTHER])
    artifact = compiler.precompiled(component_path(src, load_manifest(src)), OTHER)
    artifact.write_bytes(b"stale")
    compiler.stamp_of(artifact).write_text(json.dumps({"sha256": "0" * 64, "component": "1" * 64, "target": OTHER,
                                                       "wasmtime": compiler.WASMTIME_VERSION}))
    with pytest.raises(BundleError, match="compiled from another component"):
        build_bundle([src], "digits", "1.0.0", tmp_path / "b.tar", models=[MODELS], targets=[OTHER])
    with pytest.raises(BundleError, match="--target: unknown armv7l"):
        build_bundle([src], "digits", "1.0.0", tmp_path / "b.tar", models=[MODELS], targets=["armv7l"])


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_a_device_whose_target_is_shipped_answers_first_with_no_compile(digits_fn: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "src" / "digits"
    shutil.copytree(digits_fn, src)
    precompile_targets(component_path(src, load_manifest(src)), [HOST])  # where functions are built
    info = build_bundle([src], "digits", "1.0.0", tmp_path / "b.tar", models=[MODELS], targets=[HOST])
    assert info.manifest.functions[0].targets == [HOST]
    assert f"functions/digits/digits.{HOST}.cwasm" in dict(info.entries)

    folder = tmp_path / "device" / "bundle"  # the device: unpack, load, answer
    unpack(info.path, folder)
    spy = CompileSpy(monkeypatch)
    fn_dir = folder / "functions" / "digits"
    manifest = load_manifest(fn_dir)
    before, started = _rss_mb(), time.monotonic()
    with Runtime(tmp_path / "device" / "components") as runtime:
        sandbox = FunctionSandbox(runtime, manifest, fn_dir / "digits.wasm",
                                  FunctionHost("digits", ModelRegistry([folder / "models"]), StateStore(":memory:")))
        try:
            payload = json.dumps({"pixels": [0] * 64}).encode()
            [answer] = sandbox.handle(Event("e1", "sensors/dev1/digits", payload, time.time() * 1000))
        finally:
            sandbox.close()
    first_answer_s, grown = time.monotonic() - started, _rss_mb() - before
    assert json.loads(answer.payload)["event_id"] == "e1"
    assert spy.compiled == [], "the device compiled a component its bundle shipped compiled for it"
    assert not list((tmp_path / "device" / "components").glob("*.cwasm"))
    assert first_answer_s < 5, f"first answer took {first_answer_s:.1f} s (a compile takes ~8 s)"
    assert grown < 150, f"the RSS grew by {grown:.0f} MB"


def test_staleness_is_by_content_not_file_time(digits_fn: Path, tmp_path: Path):
    src = tmp_path / "digits"
    shutil.copytree(digits_fn, src)
    manifest = load_manifest(src)
    assert why_build(src, manifest) is None
    later = time.time() + 60
    for path in src.rglob("*"):
        if "build" not in path.relative_to(src).parts:
            os.utime(path, (later, later))  # a fresh checkout: every source newer than the component
    assert why_build(src, manifest) is None
    toml = src / "edgefn.toml"
    toml.write_text(toml.read_text().replace('version = "1.0.0"', 'version = "1.0.1"'))
    assert why_build(src, load_manifest(src)) is None  # the version is not built into the component
    (src / "app.py").write_text((src / "app.py").read_text() + "\n# changed\n")
    assert why_build(src, load_manifest(src)) == "app.py changed"
    (src / "helper.py").write_text("X = 1\n")
    assert why_build(src, load_manifest(src)) == "app.py changed (and 1 more)"


def test_building_without_componentize_py_names_the_extra(digits_fn: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "digits"
    shutil.copytree(digits_fn, src, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setitem(sys.modules, "componentize_py", None)  # as where it is not installed
    with pytest.raises(BuildError, match=r"needs componentize-py, which is not installed here: "
                                         r"pip install 'edgefn\[build\]'"):
        build(src)
