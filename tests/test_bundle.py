"""Bundles (edgefn.fleet.bundle, .pack, .unpack, .health): built from the real digits function and model,
unpacked safely, and their health check run through the unpacked component; `edgefn bundle` and
`edgefn fleet keys`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.errors import BundleError, GuestError
from edgefn.events import Event
from edgefn.files import file_sha256
from edgefn.fleet.bundle import BUNDLE_JSON
from edgefn.fleet.health import HealthCheck, Sample, check_health, load_health, run_health
from edgefn.fleet.pack import BundleInfo, build_bundle
from edgefn.fleet.unpack import COMPLETE, read_bundle, read_manifest, unpack, verify_bundle
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import load_manifest
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.model import ModelInfo
from edgefn.inference.registry import ModelRegistry
from tests.conftest import DIGITS_FN, MODELS

runner = CliRunner(env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def digit() -> tuple[list[int], int]:
    x, y = load_digits(return_X_y=True)
    return [int(v) for v in x[1500]], int(y[1500])


def _health(pixels: list[int], label: int) -> dict:
    return {"samples": [
        {"topic": "sensors/dev1/digits", "payload": {"id": "h1", "pixels": pixels},
         "expect": [{"topic": "results/dev1/digits", "json": {"event_id": "h1", "label": label},
                     "bounds": {"score": [0.5, 1.0]}}]},
    ]}


@pytest.fixture(scope="module")
def health_file(tmp_path_factory: pytest.TempPathFactory, digit: tuple[list[int], int]) -> Path:
    path = tmp_path_factory.mktemp("health") / "health.json"
    path.write_text(json.dumps(_health(*digit)))
    return path


@pytest.fixture(scope="module")
def digits_bundle(digits_fn: Path, health_file: Path, tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    out = tmp_path_factory.mktemp("bundle") / "digits-1.0.0.bundle.tar"
    return build_bundle([digits_fn], "digits", "1.0.0", out, models=[MODELS], variants=["fp32", "int8"],
                        health=health_file)


def _rewrite(src: Path, dest: Path, change: dict[str, bytes | None] | None = None,
             extra: list[tarfile.TarInfo] | None = None) -> Path:
    """A copy of the bundle tar with members replaced (bytes) or dropped (None), and extra members added."""
    change = change or {}
    with tarfile.open(src) as old, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as new:
        for member in old:
            data = old.extractfile(member).read()
            if member.name in change:
                if change[member.name] is None:
                    continue
                data = change[member.name]
                member.size = len(data)
            new.addfile(member, io.BytesIO(data))
        for info in extra or []:
            new.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return dest


# --- building -------------------------------------------------------------------------------------


def test_build_writes_the_contract_layout(digits_bundle: BundleInfo, digits_fn: Path):
    assert [p for p, _ in digits_bundle.entries] == [
        "bundle.json", "functions/digits/digits.wasm", "functions/digits/edgefn.toml", "health.json",
        "models/digits/model.int8.onnx", "models/digits/model.json", "models/digits/model.onnx"]
    doc = read_manifest(digits_bundle.path)
    assert doc["name"] == "digits" and doc["version"] == "1.0.0" and doc["health"] == "health.json"
    assert doc["functions"] == [{"name": "digits", "version": "1.0.0", "path": "functions/digits", "targets": []}]
    assert doc["models"] == ["digits"]
    assert doc["files"]["functions/digits/digits.wasm"] == file_sha256(digits_fn / "build" / "digits.wasm")
    assert digits_bundle.target == "digits-1.0.0.bundle.tar"
    with tarfile.open(digits_bundle.path) as tar:
        members = tar.getmembers()
        assert all((m.mtime, m.uid, m.gid, m.mode, m.isfile()) == (0, 0, 0, 0o644, True) for m in members)
        shipped = json.loads(tar.extractfile("models/digits/model.json").read())
    assert [v["name"] for v in shipped["variants"]] == ["fp32", "int8"]  # only what --variants named
    assert shipped["inputs"] == ModelInfo.read(MODELS / "digits").meta["inputs"]


def test_build_is_reproducible(digits_bundle: BundleInfo, digits_fn: Path, health_file: Path, tmp_path: Path):
    models = tmp_path / "models"
    shutil.copytree(MODELS / "digits", models / "digits", copy_function=shutil.copy)  # new mtimes, same bytes
    again = build_bundle([digits_fn], "digits", "1.0.0", tmp_path / "again.tar", models=[models],
                         variants=["fp32", "int8"], health=health_file)
    assert again.path.read_bytes() == digits_bundle.path.read_bytes()
    assert again.sha256 == digits_bundle.sha256
    other = build_bundle([digits_fn], "digits", "1.0.1", tmp_path / "other.tar", models=[models],
                         variants=["fp32", "int8"], health=health_file)
    assert other.sha256 != digits_bundle.sha256


def test_build_refuses_a_function_that_is_not_built(tmp_path: Path):
    src = tmp_path / "digits"
    shutil.copytree(DIGITS_FN, src, ignore=shutil.ignore_patterns("build", "__pycache__"))
    with pytest.raises(BundleError, match=r"digits: no built component .*build/digits\.wasm .*edgefn fn build"):
        build_bundle([src], "digits", "1.0.0", tmp_path / "b.tar", models=[MODELS])
    assert not (tmp_path / "b.tar").exists()


def test_build_refuses_a_component_older_than_its_sources(digits_fn: Path, tmp_path: Path):
    src = tmp_path / "digits"
    shutil.copytree(digits_fn, src)
    later = time.time() + 10
    os.utime(src / "app.py", (later, later))  # a fresh checkout: new times, the same bytes -> not stale
    build_bundle([src], "digits", "1.0.0", tmp_path / "a.tar", models=[MODELS])
    (src / "app.py").write_text((src / "app.py").read_text() + "\n# changed\n")
    with pytest.raises(BundleError, match="older than its sources"):
        build_bundle([src], "digits", "1.0.0", tmp_path / "b.tar", models=[MODELS])


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"version": "latest"}, "not a version"),
    ({"name": "Digits/../x"}, "--name"),
    ({"variants": ["fp16"]}, "has none of the variants fp16"),
    ({"variants": ["fp32", "fp16"]}, "no model of these functions has fp16"),
    ({"models": []}, "model digits: no digits/model.json"),
], ids=["version", "name", "variant", "one-unknown-variant", "no-model"])
def test_build_refuses_bad_input(digits_fn: Path, tmp_path: Path, kwargs: dict, expected: str):
    args = {"name": "digits", "version": "1.0.0", "models": [MODELS], **kwargs}
    with pytest.raises(BundleError, match=expected):
        build_bundle([digits_fn], out=tmp_path / "b.tar", **args)


def test_build_refuses_a_model_file_changed_since_it_was_registered(digits_fn: Path, tmp_path: Path):
    models = tmp_path / "models"
    shutil.copytree(MODELS / "digits", models / "digits")
    with open(models / "digits" / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match the sha256 model.json records"):
        build_bundle([digits_fn], "digits", "1.0.0", tmp_path / "b.tar", models=[models], variants=["int8"])


def test_build_refuses_an_invalid_health_check(digits_fn: Path, tmp_path: Path):
    bad = tmp_path / "health.json"
    bad.write_text(json.dumps({"samples": [{"topic": "t", "payload": {}, "payload_b64": "AA=="}]}))
    with pytest.raises(BundleError, match="exactly one of payload"):
        build_bundle([digits_fn], "digits", "1.0.0", tmp_path / "b.tar", models=[MODELS], health=bad)


# --- unpacking ------------------------------------------------------------------------------------


def test_unpack_checks_every_file_and_marks_the_folder_complete(digits_bundle: BundleInfo, tmp_path: Path):
    dest = tmp_path / "bundles" / digits_bundle.sha256
    manifest = unpack(digits_bundle.path, dest)
    assert (dest / COMPLETE).is_file() and not dest.with_name(dest.name + ".tmp").exists()
    fn = manifest.functions[0]
    assert file_sha256(fn.component(dest)) == manifest.files["functions/digits/digits.wasm"]
    assert load_manifest(fn.folder(dest)).name == "digits"
    assert ModelInfo.read(dest / "models" / "digits").variant_names() == ["fp32", "int8"]
    before = (dest / COMPLETE).stat().st_mtime_ns
    assert unpack(digits_bundle.path, dest) == manifest  # complete already: left as it is
    assert (dest / COMPLETE).stat().st_mtime_ns == before


def test_unpack_refuses_a_file_changed_after_signing(digits_bundle: BundleInfo, tmp_path: Path):
    with tarfile.open(digits_bundle.path) as tar:
        toml = tar.extractfile("functions/digits/edgefn.toml").read()
    tampered = _rewrite(digits_bundle.path, tmp_path / "t.tar",
                        {"functions/digits/edgefn.toml": toml.replace(b"timeout_ms = 500", b"timeout_ms = 900")})
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match="edgefn.toml does not match its sha256"):
        unpack(tampered, dest)
    assert not dest.exists() and not (tmp_path / "dest.tmp").exists()
    with pytest.raises(BundleError, match="does not match its sha256"):
        verify_bundle(tampered)


def test_unpack_refuses_a_missing_or_unlisted_file(digits_bundle: BundleInfo, tmp_path: Path):
    dropped = _rewrite(digits_bundle.path, tmp_path / "d.tar", {"models/digits/model.onnx": None})
    with pytest.raises(BundleError, match="lists models/digits/model.onnx, not in the bundle"):
        unpack(dropped, tmp_path / "d")
    extra = tarfile.TarInfo("models/digits/extra.onnx")
    extra.size = 3
    added = _rewrite(digits_bundle.path, tmp_path / "a.tar", extra=[extra])
    with pytest.raises(BundleError, match="extra.onnx' is not listed"):
        unpack(added, tmp_path / "a")


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(("member", "expected"), [
    (_member("../evil.txt"), "not a safe relative path"),
    (_member("functions/../../evil.txt"), "not a safe relative path"),
    (_member("/tmp/evil.txt"), "not a safe relative path"),
    (_member("functions/digits/link", tarfile.SYMTYPE, "../../../evil.txt"), "is a symbolic link"),
    (_member("functions/digits/hard", tarfile.LNKTYPE, "bundle.json"), "is a hard link"),
    (_member("functions/digits/dev", tarfile.CHRTYPE), "is a device"),
], ids=["dotdot", "inner-dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unpack_refuses_paths_outside_and_anything_but_plain_files(digits_bundle: BundleInfo, tmp_path: Path,
                                                                   member: tarfile.TarInfo, expected: str):
    hostile = _rewrite(digits_bundle.path, tmp_path / "h.tar", extra=[member])
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(BundleError, match=expected):
        unpack(hostile, dest)
    assert not dest.exists()
    assert not list(tmp_path.rglob("evil.txt"))


def test_reading_something_that_is_not_a_bundle_says_so(tmp_path: Path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a bundle"):
        read_bundle(junk)
    with pytest.raises(BundleError, match="no such bundle"):
        read_bundle(tmp_path / "missing.tar")


# --- the health check -----------------------------------------------------------------------------


def _replies(*outputs: tuple[str, object]):
    """run(topic, payload) answering every event with these outputs (dicts as JSON)."""
    encoded = [(t, json.dumps(p).encode() if not isinstance(p, bytes) else p) for t, p in outputs]
    return lambda topic, payload: list(encoded)


def _samples(*expect: dict) -> list[Sample]:
    return HealthCheck.model_validate({"samples": [{"topic": "sensors/d/x", "payload": {"a": 1},
                                                    "expect": list(expect)}]}).samples


GOOD = {"topic": "results/d/x", "json": {"label": 3}, "bounds": {"score": [0.5, 1.0]}}


def test_health_passes_when_every_expectation_matches_its_own_output():
    assert check_health(_samples(GOOD), _replies(("results/d/x", {"label": 3, "score": 0.9, "more": [1]}))) == []
    assert check_health(_samples({"topic": "results/d/x"}), _replies(("results/d/x", b"\xff raw"))) == []


@pytest.mark.parametrize(("outputs", "expected"), [
    ([("results/d/x", {"label": 5, "score": 0.9})], "label=5, want 3"),
    ([("results/d/x", {"score": 0.9})], "no 'label'"),
    ([("results/d/x", {"label": 3, "score": 0.2})], "score=0.2 outside [0.5, 1]"),
    ([("results/d/x", {"label": 3, "score": True})], "score=true is not a number"),
    ([("results/d/x", {"label": 3, "score": "0.9"})], 'score="0.9" is not a number'),
    ([("results/other/x", {"label": 3, "score": 0.9})], "topic results/other/x"),
    ([("results/d/x", b"not json")], "payload is not JSON"),
    ([], "got no output"),
    ([("results/d/x", {"label": 3, "score": 0.9}), ("edgefn/errors/x", {"error": "boom"})], "error output"),
], ids=["value", "missing-key", "bound", "bool-is-not-a-number", "string-is-not-a-number", "topic", "not-json",
        "nothing", "error-topic"])
def test_health_fails_and_says_why(outputs: list, expected: str):
    failures = check_health(_samples(GOOD), _replies(*outputs))
    assert len(failures) == 1
    assert failures[0].startswith("sample 1 (sensors/d/x): ")
    assert expected in failures[0]


def test_health_needs_one_output_for_each_expectation():
    two = _samples({"topic": "results/d/x", "json": {"label": 3}}, {"topic": "results/d/x"})
    assert len(check_health(two, _replies(("results/d/x", {"label": 3})))) == 1
    both = _replies(("results/d/x", {"label": 9}), ("results/d/x", {"label": 3}))
    assert check_health(two, both) == []  # the label-3 output goes to the first, the other to the second


def test_health_counts_labelled_samples_answered_right_and_fails_none_for_a_wrong_label():
    check = HealthCheck.model_validate({"label_key": "digit", "samples": [
        {"topic": "sensors/d/x", "payload": {"n": n}, "label": n % 3} for n in range(4)] + [
        {"topic": "sensors/d/x", "payload": {"n": 9}}]})  # unlabelled: not counted

    def answer(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        n = json.loads(payload)["n"]  # right for 0, 1 and 2; 3 is answered 2, its label is 0
        return [("edgefn/errors/x", b"{}")] if n == 9 else [("results/d/x", json.dumps({"digit": min(n, 2)}).encode())]

    result = run_health(check, answer)
    assert (result.labelled, result.right, result.accuracy) == (4, 3, 0.75)
    assert result.failures == ["sample 5 (sensors/d/x): error output edgefn/errors/x {}"]
    assert run_health(HealthCheck.model_validate({"samples": [{"topic": "t", "payload": 1}]}), answer).accuracy is None


def test_health_sample_that_raises_fails_and_the_rest_still_run():
    samples = HealthCheck.model_validate({"samples": [
        {"topic": "a", "payload_b64": base64.b64encode(b"\x00\x01").decode(), "expect": []},
        {"topic": "b", "payload": [1, 2], "expect": []}]}).samples
    seen = []

    def run(topic: str, payload: bytes):
        seen.append((topic, payload))
        if topic == "a":
            raise GuestError("bad payload")
        return []

    assert check_health(samples, run) == ["sample 1 (a): GuestError: bad payload"]
    assert seen == [("a", b"\x00\x01"), ("b", b"[1,2]")]


def test_health_file_is_validated(tmp_path: Path):
    bad = tmp_path / "h.json"
    for doc, expected in [({"samples": []}, "at least 1"), ({"samples": [{"topic": "t"}]}, "exactly one of payload"),
                          ({"samples": [{"topic": "t", "payload": 1, "expect": [{"topic": "r", "bounds": {"s": [2, 1]}}]}]},
                           "lo > hi")]:
        bad.write_text(json.dumps(doc))
        with pytest.raises(BundleError, match=expected):
            load_health(bad)


@pytest.fixture()
def unpacked_digits(digits_bundle: BundleInfo, runtime: Runtime, tmp_path: Path) -> Iterator[tuple[Path, FunctionSandbox]]:
    """The bundle unpacked, its digits function running on its own copy of the model."""
    dest = tmp_path / "bundle"
    manifest = unpack(digits_bundle.path, dest)
    fn = manifest.functions[0]
    function = load_manifest(fn.folder(dest))
    host = FunctionHost(fn.name, ModelRegistry([dest / "models"]), StateStore(":memory:"))
    sandbox = FunctionSandbox(runtime, function, fn.component(dest), host)
    yield dest, sandbox
    sandbox.close()


def _run_through(sandbox: FunctionSandbox):
    def run(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        messages = sandbox.handle(Event("health", topic, payload, time.time() * 1000))
        return [(m.topic, m.payload) for m in messages]

    return run


def test_health_check_of_the_unpacked_bundle_runs_its_function(unpacked_digits, digit: tuple[list[int], int],
                                                                tmp_path: Path):
    dest, sandbox = unpacked_digits
    assert check_health(load_health(dest / "health.json").samples, _run_through(sandbox)) == []
    pixels, label = digit
    wrong = HealthCheck.model_validate(_health(pixels, (label + 1) % 10))
    failures = check_health(wrong.samples, _run_through(sandbox))
    assert len(failures) == 1 and f"label={label}, want {(label + 1) % 10}" in failures[0]
    garbage = HealthCheck.model_validate({"samples": [{"topic": "sensors/dev1/digits", "payload": {"pixels": []}}]})
    assert "GuestError" in check_health(garbage.samples, _run_through(sandbox))[0]


# --- the command line -----------------------------------------------------------------------------


def test_cli_bundle_build_prints_sha256_and_contents(digits_fn: Path, health_file: Path, digits_bundle: BundleInfo,
                                                     tmp_path: Path):
    out = tmp_path / "cli.tar"
    result = runner.invoke(app, ["bundle", "build", str(digits_fn), "--name", "digits", "--version", "1.0.0",
                                 "--models", str(MODELS), "--variants", "fp32,int8", "--health", str(health_file),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"sha256 {digits_bundle.sha256}" in result.output
    for path in ("functions/digits/digits.wasm", "models/digits/model.int8.onnx", "health.json", BUNDLE_JSON):
        assert path in result.output
    assert out.read_bytes() == digits_bundle.path.read_bytes()


def test_cli_bundle_inspect_checks_files(digits_bundle: BundleInfo, tmp_path: Path):
    result = runner.invoke(app, ["bundle", "inspect", str(digits_bundle.path)])
    assert result.exit_code == 0, result.output
    assert digits_bundle.sha256 in result.output and "every file matches bundle.json" in result.output
    result = runner.invoke(app, ["bundle", "inspect", str(digits_bundle.path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["sha256"], doc["target"], doc["version"]) == (digits_bundle.sha256, "digits-1.0.0.bundle.tar", "1.0.0")
    tampered = _rewrite(digits_bundle.path, tmp_path / "t.tar", {"health.json": b'{"samples": []}'})
    result = runner.invoke(app, ["bundle", "inspect", str(tampered)])
    assert result.exit_code == 2
    assert "health.json does not match its sha256" in result.output


def test_cli_bundle_build_errors_exit_2(tmp_path: Path):
    src = tmp_path / "digits"
    shutil.copytree(DIGITS_FN, src, ignore=shutil.ignore_patterns("build", "__pycache__"))
    result = runner.invoke(app, ["bundle", "build", str(src), "--name", "digits", "--version", "1.0.0",
                                 "--models", str(MODELS), "-o", str(tmp_path / "b.tar")])
    assert result.exit_code == 2
    assert "no built component" in result.output


def test_cli_keys_init_once_then_only_with_force(tmp_path: Path):
    result = runner.invoke(app, ["fleet", "keys", "init", str(tmp_path / "ops")])
    assert result.exit_code == 0, result.output
    assert "1.root.json" in result.output
    result = runner.invoke(app, ["fleet", "keys", "init", str(tmp_path / "ops")])
    assert result.exit_code == 2 and "already holds keys" in result.output
    assert runner.invoke(app, ["fleet", "keys", "init", str(tmp_path / "ops"), "--force"]).exit_code == 0


@pytest.mark.parametrize("command", [["bundle"], ["bundle", "build"], ["bundle", "inspect"], ["fleet", "keys", "init"],
                                     ["fleet", "push"]], ids=" ".join)
def test_cli_help(command: list[str]):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
