"""FunctionSandbox with real components: the hostile guest and the digits example, real models."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from sklearn.datasets import load_digits
from wasmtime import component as wc

from edgefn.errors import (
    FunctionError,
    GuestError,
    GuestOutOfMemory,
    GuestTimeout,
    GuestTrap,
    OutputRejected,
    Quarantined,
)
from edgefn.events import Event
from edgefn.functions import compile as compiler
from edgefn.functions.build import component_path
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import Manifest, load_manifest
from edgefn.functions.quarantine import Quarantine
from edgefn.functions.sandbox import FunctionSandbox, Runtime, _CallCosts
from edgefn.functions.state import StateStore
from edgefn.inference.registry import ModelRegistry
from tests.conftest import GUESTS, MODELS, fill

OUTPUT_KEYS = {"event_id", "label", "score", "function", "version", "ran_on", "latency_ms"}


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry([MODELS])


def _sandbox(runtime: Runtime, folder: Path, registry: ModelRegistry, manifest: Manifest | None = None,
             **options) -> FunctionSandbox:
    manifest = manifest or load_manifest(folder)
    return FunctionSandbox(runtime, manifest, component_path(folder, manifest),
                           FunctionHost(manifest.name, registry, StateStore(":memory:")), **options)


@pytest.fixture(scope="module")
def hostile(runtime: Runtime, hostile_fn: Path, registry: ModelRegistry) -> Iterator[FunctionSandbox]:
    sandbox = _sandbox(runtime, hostile_fn, registry)
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="module")
def digits(runtime: Runtime, digits_fn: Path, registry: ModelRegistry) -> Iterator[FunctionSandbox]:
    sandbox = _sandbox(runtime, digits_fn, registry)
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="module")
def held_out() -> list[tuple[list[int], int]]:
    """Digits the model never saw in training (it was fit on images 0..1399)."""
    x, y = load_digits(return_X_y=True)
    return [([int(v) for v in x[i]], int(y[i])) for i in range(1400, len(x))]


def _event(topic: str, payload: bytes, event_id: str = "e1") -> Event:
    return Event(event_id, topic, payload, time.time() * 1000)


def _line_of(text: str) -> int:
    """The line of the hostile guest's source that holds `text`."""
    lines = (GUESTS / "hostile" / "app.py").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def misdeed(sandbox: FunctionSandbox, what: str, event_id: str = "e1"):
    return sandbox.handle(_event("sensors/dev1/hostile", what.encode(), event_id))


def digit_event(pixels: list[int], event_id: str = "d1") -> Event:
    return _event("sensors/dev1/digits", json.dumps({"id": event_id, "pixels": pixels}).encode(), event_id)


def assert_ok(sandbox: FunctionSandbox, event_id: str = "after") -> None:
    messages = misdeed(sandbox, "ok", event_id)
    assert [(m.topic, m.payload) for m in messages] == [("results/dev1/hostile", f"ok:{event_id}".encode())]


# --- the hostile guest -------------------------------------------------------------------------


def test_hostile_ok_publishes_one_message(hostile: FunctionSandbox):
    assert_ok(hostile, "first")


def test_timeout_endless_loop_is_stopped_near_deadline(hostile: FunctionSandbox):
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout, match="300 ms deadline") as info:
        misdeed(hostile, "loop")
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 2.0
    assert info.value.reason == "timeout"
    assert_ok(hostile)


def test_memory_unbounded_allocation_is_out_of_memory(hostile: FunctionSandbox):
    with pytest.raises(GuestOutOfMemory, match="48 MiB") as info:
        misdeed(hostile, "alloc")
    assert info.value.reason == "out-of-memory"
    assert_ok(hostile)


def test_trap_uncaught_exception_names_it(hostile: FunctionSandbox):
    with pytest.raises(GuestTrap) as info:
        misdeed(hostile, "trap")
    # With where it was raised, in the function's own file (componentize-py calls it /0/app.py).
    assert str(info.value) == f"uncaught exception: RuntimeError: guest bug (app.py line {_line_of('guest bug')}, in handle)"
    assert info.value.reason == "trap"
    assert_ok(hostile)


def test_trap_unbounded_recursion_is_stack_overflow(hostile: FunctionSandbox):
    with pytest.raises(GuestTrap, match="stack overflow"):
        misdeed(hostile, "stack")
    assert_ok(hostile)


def test_guest_error_value_is_guest_error(hostile: FunctionSandbox):
    with pytest.raises(GuestError, match="refused on purpose") as info:
        misdeed(hostile, "err")
    assert info.value.reason == "guest-error"
    assert_ok(hostile)


@pytest.mark.parametrize(("what", "expected"), [
    ("flood", "10 messages exceed the limit of 4"),
    ("big", "10000 output bytes exceed the limit of 4096"),
    ("topic", "topic 'elsewhere/secret' is not in the manifest's [publish] topics"),
])
def test_output_over_limits_is_rejected(hostile: FunctionSandbox, what: str, expected: str):
    with pytest.raises(OutputRejected) as info:
        misdeed(hostile, what)
    assert str(info.value) == expected
    assert info.value.reason == "output-rejected"
    assert_ok(hostile)


def test_infer_model_not_in_manifest_is_guest_error(hostile: FunctionSandbox):
    with pytest.raises(GuestError, match="'not-mine' is not listed in \\[models\\] use of hostile's manifest"):
        misdeed(hostile, "model")
    assert_ok(hostile)


def test_infer_bad_tensor_size_is_guest_error(hostile: FunctionSandbox):
    with pytest.raises(GuestError, match="needs 256 bytes, got 10"):
        misdeed(hostile, "infer-bad")
    assert_ok(hostile)


def test_isolation_guest_cannot_read_host_files(hostile: FunctionSandbox):
    content = Path("/etc/hostname").read_text().strip()
    # No preopened directory: the guest's open() fails with WASI's ENOENT (errno 44), uncaught.
    with pytest.raises(GuestTrap) as info:
        misdeed(hostile, "file")
    line = _line_of('open("/etc/hostname")')
    assert str(info.value) == ("uncaught exception: FileNotFoundError: [Errno 44] "
                               f"No such file or directory: '/etc/hostname' (app.py line {line}, in handle)")
    assert not content or content not in str(info.value).replace("/etc/hostname", "")
    assert_ok(hostile)


def test_isolation_guest_cannot_open_sockets(hostile: FunctionSandbox):
    # componentize-py's CPython has no `socket` module at all; the component does import
    # wasi:sockets, which the host links without any socket permission (WasiConfig default).
    with pytest.raises(GuestTrap) as info:
        misdeed(hostile, "socket")
    assert str(info.value).startswith("uncaught exception: ModuleNotFoundError: No module named 'socket' (app.py line ")
    assert_ok(hostile)


def test_hostile_unknown_misdeed_is_guest_error(hostile: FunctionSandbox):
    with pytest.raises(GuestError, match="unknown misdeed 'nothing'"):
        misdeed(hostile, "nothing")


def test_isolation_hostile_loop_does_not_disturb_neighbour(hostile: FunctionSandbox, digits: FunctionSandbox,
                                                           held_out: list[tuple[list[int], int]]):
    done, started = threading.Event(), threading.Event()
    hostile_results: list[str] = []

    def attack() -> None:
        n = 0
        while not done.is_set():
            started.set()
            n += 1
            try:
                misdeed(hostile, "loop" + " " * n)  # a new payload each time, or quarantine would refuse it
                hostile_results.append("ok?!")
            except GuestTimeout:
                hostile_results.append("timeout")

    attacker = threading.Thread(target=attack)
    attacker.start()
    assert started.wait(5)
    try:
        outputs = [digits.handle(digit_event(pixels, f"n{i}")) for i, (pixels, _) in enumerate(held_out[:200])]
    finally:
        done.set()
        attacker.join(5)
    assert not attacker.is_alive()
    assert len(outputs) == 200
    assert all(len(m) == 1 and m[0].topic == "results/dev1/digits" for m in outputs)
    assert hostile_results and set(hostile_results) == {"timeout"}
    assert_ok(hostile)


# --- the digits function -----------------------------------------------------------------------


def test_digits_held_out_images_are_classified(digits: FunctionSandbox, held_out: list[tuple[list[int], int]]):
    correct = 0
    for i, (pixels, label) in enumerate(held_out):
        messages = digits.handle(digit_event(pixels, f"h{i}"))
        assert len(messages) == 1
        assert messages[0].topic == "results/dev1/digits"
        out = json.loads(messages[0].payload)
        assert set(out) == OUTPUT_KEYS
        assert out["event_id"] == f"h{i}"
        assert (out["function"], out["version"], out["ran_on"]) == ("digits", "1.0.0", "local")
        assert 0.0 <= out["score"] <= 1.0
        assert out["latency_ms"] >= 0
        correct += out["label"] == label
    assert correct / len(held_out) >= 0.90


NAN_PIXELS = b'{"pixels": [NaN' + b", 0" * 63 + b"]}"


@pytest.mark.parametrize(("payload", "expected"), [
    (b"not json", "payload is not JSON"),
    (b"\xff\xfe", "payload is not JSON"),
    (json.dumps({"pixels": [0] * 63}).encode(), "a list of 64 numbers"),
    (json.dumps({"pixels": [0] * 63 + [17]}).encode(), "numbers from 0 to 16"),
    (json.dumps({"pixels": [-1] + [0] * 63}).encode(), "numbers from 0 to 16"),
    (json.dumps({"pixels": ["a"] * 64}).encode(), "numbers from 0 to 16"),
    (NAN_PIXELS, "numbers from 0 to 16"),
    (json.dumps([[0] * 64]).encode(), "must be a JSON object"),
], ids=["not-json", "invalid-utf8", "wrong-length", "above-16", "negative", "strings", "nan", "list"])
def test_digits_bad_payload_is_guest_error(digits: FunctionSandbox, payload: bytes, expected: str):
    with pytest.raises(GuestError, match=expected):
        digits.handle(_event("sensors/dev1/digits", payload))


def test_recycle_instances_renewed_after_recycle_after(runtime: Runtime, digits_fn: Path, registry: ModelRegistry,
                                                      held_out: list[tuple[list[int], int]]):
    manifest = load_manifest(digits_fn)
    manifest = manifest.model_copy(update={"limits": manifest.limits.model_copy(
        update={"recycle_after": 3, "instances": 1})})
    sandbox = _sandbox(runtime, digits_fn, registry, manifest)
    created: list[object] = []
    new_instance = sandbox._new_instance

    def counting_new_instance():
        inst = new_instance()
        created.append(inst)
        return inst

    sandbox._new_instance = counting_new_instance  # a spy: instances are still real
    try:
        for i, (pixels, _) in enumerate(held_out[:7]):
            out = json.loads(sandbox.handle(digit_event(pixels, f"r{i}"))[0].payload)
            assert out["event_id"] == f"r{i}"
    finally:
        sandbox.close()
    assert len(created) == 2  # renewed after events 3 and 6
    assert len({id(inst) for inst in created}) == 2


def test_close_is_idempotent_and_handle_after_close_fails(runtime: Runtime, hostile_fn: Path, registry: ModelRegistry):
    sandbox = _sandbox(runtime, hostile_fn, registry)
    assert_ok(sandbox)
    sandbox.close()
    sandbox.close()
    with pytest.raises(FunctionError, match="hostile is closed"):
        misdeed(sandbox, "ok")


# --- the compiled-component cache --------------------------------------------------------------


def _cached(cache: Path, wasm: Path) -> list[Path]:
    digest = hashlib.sha256(wasm.read_bytes()).hexdigest()[:32]
    return sorted(cache.glob(f"{digest}-*.cwasm"))


def test_component_cache_reuses_compiled_file(runtime: Runtime, hostile_fn: Path, component_cache: Path):
    wasm = component_path(hostile_fn, load_manifest(hostile_fn))
    runtime.load(wasm)  # compiled by the session runtime at the latest here
    [cwasm] = _cached(component_cache, wasm)
    before = cwasm.stat()
    with Runtime(component_cache) as fresh:
        fresh.load(wasm)
        fresh.load(wasm)
    [again] = _cached(component_cache, wasm)
    after = again.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert not list(component_cache.glob("*.tmp"))


def test_component_cache_corrupted_file_is_recompiled(tmp_path: Path, hostile_fn: Path, component_cache: Path,
                                                      registry: ModelRegistry):
    manifest = load_manifest(hostile_fn)
    wasm = component_path(hostile_fn, manifest)
    [good] = _cached(component_cache, wasm) or [None]
    assert good is not None, "the session cache should hold the hostile component"
    cache = tmp_path / "components"
    cache.mkdir()
    junk = cache / good.name
    junk.write_bytes(b"not a compiled component" * 100)
    with Runtime(cache) as fresh:
        sandbox = FunctionSandbox(fresh, manifest, wasm, FunctionHost(manifest.name, registry, StateStore(":memory:")))
        try:
            assert_ok(sandbox)
        finally:
            sandbox.close()
    [recompiled] = _cached(cache, wasm)
    assert recompiled.name == good.name
    assert recompiled.stat().st_size > 1_000_000
    assert not recompiled.read_bytes().startswith(b"not a compiled")


# --- batches -------------------------------------------------------------------------------------


def _comparable(answer) -> object:
    if isinstance(answer, FunctionError):
        return (type(answer).__name__, str(answer))
    return [(m.topic, {k: v for k, v in json.loads(m.payload).items() if k != "latency_ms"}) for m in answer]


# -- payloads across the boundary ------------------------------------------------------------------

EVERY_BYTE = bytes(range(256)) * 3


def test_payloads_of_every_byte_value_cross_as_latin1_both_ways(hostile: FunctionSandbox):
    """The daemon calls handle-latin1: each byte a code point of a string, there and back."""
    assert all(inst.handle_latin1 is not None for inst in list(hostile._made.values()))
    [one] = hostile.handle(_event("sensors/dev1/hostile", b"echo:" + EVERY_BYTE))
    assert one.payload == EVERY_BYTE
    events = [_event("sensors/dev1/hostile", b"echo:" + EVERY_BYTE[i:] + bytes([i]), f"b{i}") for i in (0, 128, 255)]
    answers = hostile.handle_batch(events)
    assert [a[0].payload for a in answers] == [e.payload[len(b"echo:"):] for e in events]


@pytest.fixture(scope="module")
def before_latin1_fn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/before-latin1, built against its own copy of the older world."""
    folder = tmp_path_factory.mktemp("fn") / "before-latin1"
    shutil.copytree(GUESTS / "before-latin1", folder)
    (folder / "build").mkdir()
    subprocess.run([sys.executable, "-c", "import sys, componentize_py; sys.argv[0] = 'componentize-py'; "
                    "componentize_py.script()", "-d", "wit", "-w", "function", "componentize", "app",
                    "-o", "build/before.wasm"], cwd=folder, check=True, capture_output=True)
    return folder


def test_component_built_before_handle_latin1_runs_with_byte_lists(runtime: Runtime, before_latin1_fn: Path,
                                                                    registry: ModelRegistry):
    sandbox = _sandbox(runtime, before_latin1_fn, registry)
    try:
        assert all(inst.handle_latin1 is None for inst in list(sandbox._made.values()))
        [one] = sandbox.handle(_event("sensors/dev1/before", EVERY_BYTE))
        assert one.payload == b"one:" + EVERY_BYTE
        answers = sandbox.handle_batch([_event("sensors/dev1/before", bytes([i]) * 3, f"b{i}") for i in (0, 200)])
        assert [a[0].payload for a in answers] == [b"batch:\0\0\0", b"batch:" + bytes([200]) * 3]
    finally:
        sandbox.close()


def test_batch_answers_equal_one_by_one_answers(digits: FunctionSandbox, held_out: list[tuple[list[int], int]]):
    events = [digit_event(pixels, f"b{i}") for i, (pixels, _) in enumerate(held_out[:40])]
    events[3] = _event("sensors/dev1/digits", b"not json", "bad-json")
    events[17] = _event("sensors/dev1/digits", b'{"id": "short", "pixels": [1]}', "short")
    batched = digits.handle_batch(events)
    alone = [digits._one(e) for e in events]
    assert [_comparable(a) for a in batched] == [_comparable(a) for a in alone]
    assert isinstance(batched[3], GuestError) and isinstance(batched[17], GuestError)
    labels = [json.loads(a[0].payload)["label"] for i, a in enumerate(batched) if i not in (3, 17)]
    truth = [label for i, (_, label) in enumerate(held_out[:40]) if i not in (3, 17)]
    assert sum(p == t for p, t in zip(labels, truth, strict=True)) / len(truth) >= 0.85


def test_batch_with_a_trap_pins_the_error_on_its_event(hostile: FunctionSandbox):
    payloads = ["ok", "ok", "trap", "ok", "loop", "err", "ok"]
    events = [_event("sensors/dev1/hostile", p.encode(), f"h{i}") for i, p in enumerate(payloads)]
    answers = hostile.handle_batch(events)
    kinds = [type(a).__name__ if isinstance(a, FunctionError) else "ok" for a in answers]
    assert kinds == ["ok", "ok", "GuestTrap", "ok", "GuestTimeout", "GuestError", "ok"]
    assert [m.payload for m in answers[6]] == [b"ok:h6"]
    assert_ok(hostile)


def test_batch_output_limits_apply_per_event(hostile: FunctionSandbox):
    answers = hostile.handle_batch([_event("sensors/dev1/hostile", p.encode(), f"l{i}")
                                    for i, p in enumerate(["ok", "topic", "ok"])])
    assert isinstance(answers[1], OutputRejected)
    assert [m.payload for m in answers[0]] == [b"ok:l0"] and [m.payload for m in answers[2]] == [b"ok:l2"]


@pytest.mark.parametrize(("what", "expected"), [("badtopic", "control character"), ("wildtopic", "wildcard")])
def test_output_topic_a_broker_would_refuse_is_rejected(hostile: FunctionSandbox, what: str, expected: str):
    with pytest.raises(OutputRejected, match=expected):
        misdeed(hostile, what)
    assert_ok(hostile)


def test_pool_slot_survives_a_failed_renewal(runtime: Runtime, hostile_fn: Path, registry: ModelRegistry,
                                             monkeypatch: pytest.MonkeyPatch):
    sandbox = _sandbox(runtime, hostile_fn, registry)  # one instance (the hostile manifest)
    real = sandbox._new_instance
    failures = iter([OSError("no space left on device")])

    def flaky():
        for exc in failures:
            raise exc
        return real()

    monkeypatch.setattr(sandbox, "_new_instance", flaky)
    with pytest.raises(GuestTrap):
        misdeed(sandbox, "trap")  # the trapped instance goes, its renewal fails once
    assert_ok(sandbox, "recovered")  # the slot is filled again instead of blocking forever
    sandbox.close()


def test_state_outlives_instances_and_restarts(runtime: Runtime, hostile_fn: Path, registry: ModelRegistry,
                                               tmp_path: Path):
    def counts(store: StateStore, n: int) -> list[bytes]:
        manifest = load_manifest(hostile_fn)
        sandbox = FunctionSandbox(runtime, manifest, component_path(hostile_fn, manifest),
                                  FunctionHost(manifest.name, registry, store))
        try:
            got = [misdeed(sandbox, "count")[0].payload for _ in range(n)]
            with pytest.raises(GuestTrap):
                misdeed(sandbox, "trap")  # a fresh instance afterwards: the state is not in it
            got.append(misdeed(sandbox, "count")[0].payload)
            return got
        finally:
            sandbox.close()
            store.close()

    assert counts(StateStore(tmp_path / "state.sqlite"), 2) == [b"1", b"2", b"3"]
    assert counts(StateStore(tmp_path / "state.sqlite"), 1) == [b"4", b"5"]  # as after a restart


def test_state_past_its_bound_traps_with_the_reason(hostile: FunctionSandbox):
    with pytest.raises(GuestTrap, match="64 KiB"):
        misdeed(hostile, "bigstate")
    assert_ok(hostile)


# --- damaged, interrupted and uncached compiles ----------------------------------------------------

ANSWER_WAT = """(component
  (core module $m (func (export "f") (result i32) i32.const 42))
  (core instance $i (instantiate $m))
  (func (export "answer") (result u32) (canon lift (core func $i "f"))))"""

LOAD_AND_CALL = """
import sys
from pathlib import Path
import wasmtime
from wasmtime import component as wc
from edgefn.functions.sandbox import Runtime
with Runtime(Path(sys.argv[1])) as runtime:
    component = runtime.load(Path(sys.argv[2]))
    store = wasmtime.Store(runtime.engine)
    store.set_epoch_deadline(1000)
    print(wc.Linker(runtime.engine).instantiate(store, component).get_func(store, "answer")(store))
"""


@pytest.fixture()
def answer_wasm(tmp_path: Path) -> Path:
    """A tiny real component (compiles in milliseconds) whose export `answer` returns 42."""
    wasm = tmp_path / "answer.wasm"
    wasm.write_bytes(bytes(wasmtime.wat2wasm(ANSWER_WAT)))
    return wasm


def _garble_code(artifact: Path) -> None:
    """Zero the machine code (the ELF `.text` section) of a compiled artifact, header and layout kept."""
    data = bytearray(artifact.read_bytes())
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, shstrndx = struct.unpack_from("<HH", data, 0x3C)
    sections = [struct.unpack_from("<I4xQQQQ", data, shoff + 64 * i) for i in range(shnum)]
    names = sections[shstrndx][3]
    for name, _flags, _addr, offset, size in sections:
        if data[names + name:data.index(b"\0", names + name)] == b".text":
            data[offset:offset + size] = bytes(size)
    artifact.write_bytes(bytes(data))


def _compiled(cache: Path, wasm: Path) -> Path:
    """`wasm` compiled into the cache `cache` by a runtime; its artifact."""
    with Runtime(cache) as runtime:
        runtime.load(wasm)
    [artifact] = _cached(cache, wasm)
    return artifact


def _answer_in_child(cache: Path, wasm: Path) -> str:
    """Load `wasm` with the cache `cache` and call its `answer` in a child: mapping and running damaged code
    kills the process (SIGSEGV, SIGILL), which would take pytest down too. What the child logged."""
    child = subprocess.run([sys.executable, "-c", LOAD_AND_CALL, str(cache), str(wasm)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, f"the runtime ran a damaged artifact (exit status {child.returncode})"
    assert child.stdout.strip() == "42"
    return child.stderr


def test_component_cache_damaged_code_is_compiled_again_not_run(tmp_path: Path, answer_wasm: Path):
    cache = tmp_path / "components"
    artifact = _compiled(cache, answer_wasm)
    _garble_code(artifact)
    logged = _answer_in_child(cache, answer_wasm)
    assert f"{artifact.name}: not mapped (its bytes do not match its checksum)" in logged
    stamp = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == stamp["sha256"]


# As ANSWER_WAT, but its core module has a start function: instantiating it runs compiled code, as
# instantiating a componentize-py component does (its damaged code then crashes the process at load).
STARTING_WAT = """(component
  (core module $m
    (global $answer (mut i32) (i32.const 0))
    (func $start i32.const 42 global.set $answer)
    (start $start)
    (func (export "f") (result i32) global.get $answer))
  (core instance $i (instantiate $m))
  (func (export "answer") (result u32) (canon lift (core func $i "f"))))"""
CRASHED = r"loading it killed a trial process with SIG(SEGV|ILL|BUS)"


@pytest.fixture()
def starting_wasm(tmp_path: Path) -> Path:
    wasm = tmp_path / "build" / "starting.wasm"
    wasm.parent.mkdir(exist_ok=True)
    wasm.write_bytes(bytes(wasmtime.wat2wasm(STARTING_WAT)))
    return wasm


def _forge(artifact: Path) -> None:
    """Zero an artifact's code and rewrite its stamp's sha256 to match: damage no stamp check can tell."""
    _garble_code(artifact)
    stamp = artifact.with_name(artifact.name + ".json")
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()),
                                 "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest()}))


def _lines_naming(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if name in line]


def test_component_cache_artifact_that_crashes_its_loader_is_compiled_again(tmp_path: Path, starting_wasm: Path):
    cache = tmp_path / "components"
    artifact = _compiled(cache, starting_wasm)
    _forge(artifact)  # the old code mapped it and died of it (SIGSEGV)
    [line] = _lines_naming(_answer_in_child(cache, starting_wasm), artifact.name)
    assert re.search(rf"not mapped \({CRASHED}\); compiling it again", line), line
    assert compiler.problem_with(artifact) is None and len(list(cache.glob("*.crashed"))) == 1


def test_a_trusted_artifact_is_mapped_with_no_trial_load(tmp_path: Path, starting_wasm: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    from edgefn.functions import trial

    cache = tmp_path / "components"
    artifact = _compiled(cache, starting_wasm)  # then loaded in a child once: trusted
    assert (cache / f"{compiler.stamped_sha256(artifact)}.trusted").exists()
    children: list[list[str]] = []
    real = subprocess.run

    def run(args: list[str], **options: object) -> subprocess.CompletedProcess:
        children.append(args)
        return real(args, **options)

    monkeypatch.setattr(trial.subprocess, "run", run)
    with Runtime(cache) as runtime:
        runtime.load(starting_wasm)
    assert children == []


TRIAL_OF_A_MISCOMPILE = """
import sys
from pathlib import Path
from edgefn.errors import BuildError
from edgefn.functions import compile as compiler
from edgefn.functions.sandbox import Runtime
from tests.test_sandbox import _forge
compile_in_child = compiler.compile_in_child
def miscompile(wasm, artifact, target=None):  # every compile of this wasmtime comes out broken
    compile_in_child(wasm, artifact, target)
    _forge(artifact)
compiler.compile_in_child = miscompile
with Runtime(Path(sys.argv[1])) as runtime:
    try:
        runtime.load(Path(sys.argv[2]))
    except BuildError as exc:
        print(exc)
"""


def test_an_artifact_that_crashes_its_loader_even_compiled_afresh_is_refused(tmp_path: Path, starting_wasm: Path):
    child = subprocess.run([sys.executable, "-c", TRIAL_OF_A_MISCOMPILE, str(tmp_path / "components"),
                            str(starting_wasm)], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, f"loading a broken artifact killed the process (exit status {child.returncode})"
    [artifact] = {m.group(1) for m in re.finditer(r"(\w+-wasmtime[\d.]+\.cwasm)", child.stdout + child.stderr)}
    assert re.fullmatch(rf"{starting_wasm}: its freshly compiled artifact {artifact} does not load \({CRASHED}\)",
                        child.stdout.strip()), child.stdout


@pytest.mark.slow
def test_a_forged_digits_artifact_is_compiled_again_by_fn_invoke(runtime: Runtime, digits_fn: Path,
                                                                 component_cache: Path, tmp_path: Path):
    """The finding: the digits component's cached artifact, its code zeroed and its stamp rewritten to
    match, killed `edgefn fn invoke` (and the daemon) with SIGSEGV and nothing said."""
    wasm = component_path(digits_fn, load_manifest(digits_fn))
    runtime.load(wasm)  # compiled into the session's cache at the latest here
    cache = tmp_path / "state" / "components"
    cache.mkdir(parents=True)
    for compiled in _cached(component_cache, wasm):
        for path in (compiled, compiled.with_name(compiled.name + ".json")):
            (cache / path.name).write_bytes(path.read_bytes())
    [artifact] = _cached(cache, wasm)
    _forge(artifact)
    payload = json.dumps({"id": "forged-1", "pixels": [0] * 64})
    child = subprocess.run([sys.executable, "-m", "edgefn", "fn", "invoke", str(digits_fn), "--topic",
                            "sensors/dev1/digits", "--payload", payload, "--state-dir", str(tmp_path / "state"),
                            "--models", str(MODELS), "--state", str(tmp_path / "invoke-state")],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"exit status {child.returncode}: {child.stderr[-2000:]}"
    assert json.loads(child.stdout.split(" ", 1)[1])["event_id"] == "forged-1"
    [line] = _lines_naming(child.stderr, artifact.name)
    assert re.search(rf"not mapped \({CRASHED}\); compiling it again", line), line


def test_runtime_removes_what_an_interrupted_compile_left(tmp_path: Path):
    cache = tmp_path / "components"
    cache.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = cache / f"{'0' * 32}-wasmtime50.cwasm.{gone.pid}.tmp"
    left.write_bytes(b"half a compiled component")
    with Runtime(cache):
        assert not left.exists()


def test_leftovers_of_a_dead_writer_go_and_those_of_a_live_one_stay(tmp_path: Path):
    """Names as write_atomic makes them (.<name>.<pid>.<random>.tmp), where the name holds digits too."""
    from edgefn.files import remove_leftovers

    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        name = f"{'0' * 32}-wasmtime50.0.1.cwasm"
        dead = tmp_path / f".{name}.{gone.pid}.k2x9q.tmp"
        live = tmp_path / f".{name}.{alive.pid}.a8bq1.tmp"
        dead.write_bytes(b"x")
        live.write_bytes(b"x")
        assert remove_leftovers(tmp_path) == [dead] and live.exists()
    finally:
        alive.kill()
        alive.wait()


def test_component_on_a_full_disk_runs_uncached_and_leaves_nothing_behind(small_disk: Path, answer_wasm: Path):
    cache = small_disk / "components"
    cache.mkdir()
    fill(small_disk)
    with Runtime(cache) as runtime:
        component = runtime.load(answer_wasm)
        store = wasmtime.Store(runtime.engine)
        store.set_epoch_deadline(1000)
        assert wc.Linker(runtime.engine).instantiate(store, component).get_func(store, "answer")(store) == 42
    assert list(cache.iterdir()) == []


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_cold_load_compiles_outside_the_daemon_process(tmp_path: Path, digits_fn: Path):
    wasm = component_path(digits_fn, load_manifest(digits_fn))
    with Runtime(tmp_path / "components") as fresh:
        before = _rss_mb()
        fresh.load(wasm)  # ~8 s of compiling, ~450 MB at its peak: in a child
        grown = _rss_mb() - before
    assert grown < 60, f"the daemon's RSS grew by {grown:.0f} MB across a cold load"


# --- poison: bisecting a failed batch, quarantine ------------------------------------------------


class Spy:
    """Counts a sandbox's guest calls and instance creations; the instances stay real."""

    def __init__(self, sandbox: FunctionSandbox, monkeypatch: pytest.MonkeyPatch):
        self.calls, self.created = 0, 0
        call, new_instance = sandbox._call, sandbox._new_instance

        def counting_call(*args):
            self.calls += 1
            return call(*args)

        def counting_new_instance():
            self.created += 1
            return new_instance()

        monkeypatch.setattr(sandbox, "_call", counting_call)
        monkeypatch.setattr(sandbox, "_new_instance", counting_new_instance)


@pytest.fixture()
def fresh_hostile(runtime: Runtime, hostile_fn: Path, registry: ModelRegistry) -> Iterator[FunctionSandbox]:
    sandbox = _sandbox(runtime, hostile_fn, registry)  # its own quarantine, one instance
    yield sandbox
    sandbox.close()


def _halving(sandbox: FunctionSandbox, monkeypatch: pytest.MonkeyPatch, pays: bool) -> None:
    """Pin the measured choice between halving a failed batch and running its events alone."""
    monkeypatch.setattr(sandbox._costs, "halving_pays", lambda events: pays)


def _hostile_batch(sandbox: FunctionSandbox, payloads: list[str], prefix: str = "p"):
    events = [_event("sensors/dev1/hostile", p.encode(), f"{prefix}{i}") for i, p in enumerate(payloads)]
    return sandbox.handle_batch(events)


def _kinds(answers) -> list[str]:
    return [type(a).__name__ if isinstance(a, FunctionError) else "ok" for a in answers]


def test_bisect_one_trap_in_16_costs_a_few_calls(fresh_hostile: FunctionSandbox, monkeypatch: pytest.MonkeyPatch):
    _halving(fresh_hostile, monkeypatch, pays=True)
    spy = Spy(fresh_hostile, monkeypatch)
    payloads = ["ok"] * 16
    payloads[11] = "trap"
    answers = _hostile_batch(fresh_hostile, payloads)
    assert _kinds(answers) == ["ok"] * 11 + ["GuestTrap"] + ["ok"] * 4
    assert "RuntimeError: guest bug" in str(answers[11])
    assert [[m.payload for m in a] for i, a in enumerate(answers) if i != 11] == [
        [f"ok:p{i}".encode()] for i in range(16) if i != 11]
    # Halving 16 -> 8 -> 4 -> 2 -> 1: a failed and a good half per level, and the call of 16.
    # Re-running every event alone took 17 calls.
    assert spy.calls == 9
    assert spy.created == 5  # one per failed call: 16, 8, 4, 2 events, then the culprit alone


def test_bisect_two_poisons_each_get_their_error(fresh_hostile: FunctionSandbox, monkeypatch: pytest.MonkeyPatch):
    _halving(fresh_hostile, monkeypatch, pays=True)
    spy = Spy(fresh_hostile, monkeypatch)
    payloads = ["ok"] * 16
    payloads[2], payloads[13] = "stack", "alloc"
    answers = _hostile_batch(fresh_hostile, payloads)
    expected = ["ok"] * 16
    expected[2], expected[13] = "GuestStackOverflow", "GuestOutOfMemory"
    assert _kinds(answers) == expected
    assert str(answers[2]) == "stack overflow"
    assert all(a[0].payload == f"ok:p{i}".encode() for i, a in enumerate(answers) if i not in (2, 13))
    assert spy.calls == 1 + 7 + 7  # the 16, then 7 calls to corner each culprit in its half of 8; alone: 17
    assert_ok(fresh_hostile)


def test_bisect_where_halving_does_not_pay_runs_events_alone(fresh_hostile: FunctionSandbox,
                                                            monkeypatch: pytest.MonkeyPatch):
    _halving(fresh_hostile, monkeypatch, pays=False)
    spy = Spy(fresh_hostile, monkeypatch)
    payloads = ["ok"] * 16
    payloads[11] = "trap"
    assert _kinds(_hostile_batch(fresh_hostile, payloads)) == ["ok"] * 11 + ["GuestTrap"] + ["ok"] * 4
    assert (spy.calls, spy.created) == (1 + 16, 2)


def test_bisect_costs_measured_decide_halving():
    costs = _CallCosts()
    assert costs.halving_pays(2)  # nothing measured yet: halve
    costs.note(0.004, failed=True, events=32)
    costs.note(0.0001, failed=False, events=32)  # a batch says nothing of a call alone
    assert costs.halving_pays(2)
    costs.note(0.0005, failed=False, events=1)
    assert costs.halving_pays(32) and not costs.halving_pays(16)  # 16 x 0.5 ms > 4 ms > 8 x 0.5 ms


def test_bisect_timeout_runs_the_batch_alone(fresh_hostile: FunctionSandbox, monkeypatch: pytest.MonkeyPatch):
    spy = Spy(fresh_hostile, monkeypatch)
    t0 = time.monotonic()
    answers = _hostile_batch(fresh_hostile, ["ok", "loop", "ok", "ok"])
    elapsed = time.monotonic() - t0
    assert _kinds(answers) == ["ok", "GuestTimeout", "ok", "ok"]
    # One batch, then each event alone: halving would call in pairs first (1 + 2 + 2 + ...).
    assert spy.calls == 1 + 4
    # The batch's deadline (4 x 300 ms), then the loop's own (300 ms). The count above is what tells
    # alone from halves; this bound only catches a deadline that never struck (a machine at load 20
    # took 2.3 s).
    assert elapsed < 10


def test_quarantine_after_three_traps_answers_without_running(fresh_hostile: FunctionSandbox,
                                                              monkeypatch: pytest.MonkeyPatch):
    spy = Spy(fresh_hostile, monkeypatch)
    for _ in range(3):
        with pytest.raises(GuestTrap):
            misdeed(fresh_hostile, "trap")
    calls = spy.calls
    answers = _hostile_batch(fresh_hostile, ["ok", "trap", "ok", "trap"])
    assert _kinds(answers) == ["ok", "Quarantined", "ok", "Quarantined"]
    assert answers[1].reason == "quarantined" and "failed 3 times" in str(answers[1])
    assert "RuntimeError: guest bug" in str(answers[1])
    assert spy.calls == calls + 1  # the two good events, in one batch around the refused ones
    assert fresh_hostile.quarantine.refused == 2
    with pytest.raises(Quarantined):
        misdeed(fresh_hostile, "trap")


def test_quarantine_suspect_runs_alone_and_spares_the_batch(fresh_hostile: FunctionSandbox,
                                                             monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(GuestTrap):
        misdeed(fresh_hostile, "trap")  # one strike: a suspect from now on
    spy = Spy(fresh_hostile, monkeypatch)
    answers = _hostile_batch(fresh_hostile, ["ok", "ok", "trap", "ok", "ok", "ok"])
    assert _kinds(answers) == ["ok", "ok", "GuestTrap", "ok", "ok", "ok"]
    assert (spy.calls, spy.created) == (3, 1)  # two batches that succeed, the suspect alone


def test_quarantine_ignores_errors_the_guest_returns(fresh_hostile: FunctionSandbox):
    for _ in range(5):
        answers = _hostile_batch(fresh_hostile, ["err", "ok", "flood"])
        assert _kinds(answers) == ["GuestError", "ok", "OutputRejected"]
    assert fresh_hostile.quarantine.entries == 0


def test_quarantine_expires(runtime: Runtime, hostile_fn: Path, registry: ModelRegistry):
    now = [0.0]
    sandbox = _sandbox(runtime, hostile_fn, registry, quarantine=Quarantine(hold_s=600, clock=lambda: now[0]))
    try:
        kinds = [_kinds(_hostile_batch(sandbox, ["trap", "ok"]))[0] for _ in range(4)]
        assert kinds == ["GuestTrap"] * 3 + ["Quarantined"]
        now[0] += 601
        assert _kinds(_hostile_batch(sandbox, ["trap", "ok"])) == ["GuestTrap", "ok"]
    finally:
        sandbox.close()


def test_quarantine_off_runs_every_time(runtime: Runtime, hostile_fn: Path, registry: ModelRegistry):
    sandbox = _sandbox(runtime, hostile_fn, registry, quarantine=False)
    try:
        for _ in range(4):
            with pytest.raises(GuestTrap):
                misdeed(sandbox, "trap")
    finally:
        sandbox.close()


def _nested(depth: int, event_id: str) -> Event:
    body = f'{{"id": "{event_id}", "pixels": '.encode() + b"[" * depth + b"]" * depth + b"}"
    return _event("sensors/dev1/digits", body, event_id)


def test_bisect_stack_overflow_runs_the_deep_events_alone(runtime: Runtime, digits_fn: Path, registry: ModelRegistry,
                                                          held_out: list[tuple[list[int], int]],
                                                          monkeypatch: pytest.MonkeyPatch):
    sandbox = _sandbox(runtime, digits_fn, registry)
    try:
        _halving(sandbox, monkeypatch, pays=True)
        spy = Spy(sandbox, monkeypatch)
        good = [digit_event(pixels, f"g{i}") for i, (pixels, _) in enumerate(held_out[:15])]
        answers = sandbox.handle_batch([*good[:11], _nested(2000, "n0"), *good[11:]])
        assert _kinds(answers) == ["ok"] * 11 + ["GuestStackOverflow"] + ["ok"] * 4
        # The batch of 16, the one nested deep alone, the other 15 together; halving took 9 calls, 5 instances.
        assert (spy.calls, spy.created) == (3, 2)
    finally:
        sandbox.close()


def test_quarantine_shape_of_nested_json_in_digits(runtime: Runtime, digits_fn: Path, registry: ModelRegistry,
                                                   held_out: list[tuple[list[int], int]]):
    sandbox = _sandbox(runtime, digits_fn, registry)
    try:
        good = [digit_event(pixels, f"g{i}") for i, (pixels, _) in enumerate(held_out[:13])]
        # Three different 4 kB payloads nested 2000 deep overflow the guest's stack...
        answers = sandbox.handle_batch([*good[:5], _nested(2000, "n0"), *good[5:9], _nested(2000, "n1"),
                                        _nested(2000, "n2"), *good[9:]])
        assert _kinds(answers) == ["ok"] * 5 + ["GuestStackOverflow"] + ["ok"] * 4 + ["GuestStackOverflow"] * 2 + ["ok"] * 4
        assert str(answers[5]) == "stack overflow"
        # ... so a fourth one is refused; shallow bad JSON is still the guest's own error.
        answers = sandbox.handle_batch([_nested(2000, "n3"), good[0], _event("sensors/dev1/digits", b"[[[", "bad")])
        assert _kinds(answers) == ["Quarantined", "ok", "GuestError"]
        assert str(answers[0]).startswith("JSON nested 2,000 arrays and 1 object deep, as deep as one of 3 payloads "
                                          "that overflowed the guest's stack in _parse_array_unicode, scan_once_unicode")
    finally:
        sandbox.close()
