"""The host-side check of a function's sources before componentize-py: one line, at once, at the real path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefn.cli._toolkit import build_stale
from edgefn.cli.main import app
from edgefn.errors import BuildError
from edgefn.functions.build import scaffold
from edgefn.functions.precheck import check_sources

runner = CliRunner(env={"COLUMNS": "400"})


@pytest.fixture()
def fn(tmp_path: Path) -> Path:
    return scaffold("temp", tmp_path)


def test_a_syntax_error_is_said_at_its_file_and_line_within_a_second(fn: Path):
    # It took componentize-py 6.5 s, and named the file /0/app.py.
    source = fn / "app.py"
    line = len(source.read_text().splitlines()) + 2
    source.write_text(source.read_text() + "\ndef broken(:\n    pass\n")
    started = time.monotonic()
    result = runner.invoke(app, ["fn", "build", str(fn)])
    took = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {source}:{line}:12: invalid syntax"), result.output
    assert "def broken(:" in result.output and "/0/" not in result.output and "RUST_BACKTRACE" not in result.output
    assert took < 1.0, f"{took:.2f} s"


@pytest.mark.parametrize(("module", "why"), [
    ("numpy", "a native extension"),  # the guest is CPython on WASI: no wheel of numpy runs there
    ("socket", "the sandbox refuses every connection"),
    ("lzma", "not in CPython for WASI"),
    ("subprocess", "WASI has no processes"),
    ("no_such_module_here", "no such module"),
])
def test_an_import_that_cannot_work_in_the_guest_is_refused_in_one_line(fn: Path, module: str, why: str):
    source = fn / "app.py"
    source.write_text(f"import json\nimport {module}\n" + source.read_text())
    with pytest.raises(BuildError) as info:
        check_sources(fn)
    text = str(info.value)
    assert text.startswith(f"{source}:2: import {module}: ") and why in text and "\n" not in text, text


def test_imports_inside_a_function_are_left_to_the_guest(fn: Path):
    # They are tried per event, in the guest (the hostile guest's socket misdeed relies on it).
    source = fn / "app.py"
    source.write_text(source.read_text() + "\n\ndef later():\n    import socket\n    return socket\n")
    assert check_sources(fn).bundled == {}


def test_a_pure_python_package_is_bundled_and_said(fn: Path):
    source = fn / "app.py"
    source.write_text("import packaging.version\nfrom edgefn_guest import Function\n" + source.read_text())
    bundled = check_sources(fn).bundled
    assert list(bundled) == ["packaging"] and bundled["packaging"].name == "packaging"


def test_run_builds_the_rest_when_one_function_does_not_build(tmp_path: Path):
    # `edgefn run` builds what is stale; one function that does not build no longer ends the command.
    good, bad = scaffold("good", tmp_path), scaffold("bad", tmp_path)
    (good / "build").mkdir()
    (good / "build" / "good.wasm").write_bytes(b"\0asm")  # fresh: newer than its sources
    (bad / "app.py").write_text("def x(:\n")
    failed = build_stale([tmp_path], keep_going=True)
    assert list(failed) == [bad] and failed[bad].startswith(f"{bad.resolve() / 'app.py'}:1:")
    with pytest.raises(BuildError):
        build_stale([tmp_path])
