"""Compiling a component into a verified artifact: for this CPU in a child process (the daemon's cache),
or for a named target where functions are built (the artifacts a bundle ships).

Compiling a Python component peaks at ~450 MB; done in the daemon, that peak would stay in its RSS
for good. The child gives it back when it exits, and the daemon only maps the artifact:

    python -m edgefn.functions.compile <component.wasm> <artifact.cwasm> [<target>]

Each artifact has a stamp `<artifact>.json`, written after it: the artifact's sha256, the component it
was compiled from (sha256), the wasmtime version and the target. Mapping an artifact that is damaged, or
was made by another wasmtime or for another CPU can kill the process (SIGILL, SIGSEGV) before any error
can be caught, so one whose stamp does not match all four is never mapped. Exit status: 0 written, 1 not
a loadable component, 2 could not be written, 3 this wasmtime cannot compile for that target; the reason
is the one line on stderr.

A target ("x86_64", "aarch64") compiles for its architecture's baseline, with no feature of the machine
that compiles: the artifact runs on every CPU of that architecture. This CPU's cache is compiled with
every feature it has.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import wasmtime
from wasmtime import component as wc

import edgefn
from edgefn.errors import BuildError
from edgefn.files import file_sha256, write_atomic

NOT_A_COMPONENT, NOT_WRITTEN, NOT_THIS_TARGET = 1, 2, 3
WASMTIME_VERSION = importlib.metadata.version("wasmtime")
# The targets a bundle can carry (the boards edgefn runs on), and the triple wasmtime compiles each for.
TARGETS = {"x86_64": "x86_64-unknown-linux-gnu", "aarch64": "aarch64-unknown-linux-gnu"}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def host_target() -> str:
    """This machine's target ("x86_64", "aarch64"), or its own machine name where edgefn ships none."""
    machine = platform.machine().lower()
    return _MACHINES.get(machine, machine)


def parse_targets(text: str) -> list[str]:
    """'aarch64,x86_64' -> the targets, checked; ValueError names the unknown one."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown target {', '.join(unknown) or repr(text)} (known: {', '.join(TARGETS)})")
    return sorted(set(targets))


def engine(target: str | None = None) -> wasmtime.Engine:
    """The engine every artifact is compiled for (one compiled with other settings does not map); with a
    target, one that only compiles, for that target's baseline."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    if target is not None:
        config.target = TARGETS[target]
    return wasmtime.Engine(config)


def precompiled(wasm: Path, target: str) -> Path:
    """Where the artifact of `wasm` for `target` lies beside it: build/digits.wasm -> build/digits.aarch64.cwasm."""
    return Path(wasm).with_name(f"{Path(wasm).stem}.{target}.cwasm")


def stamp_of(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def problem_with(artifact: Path, component: str | None = None, target: str | None = None) -> str | None:
    """Why `artifact` must not be mapped here, or None: no stamp, another wasmtime's, another target's,
    compiled from another component (`component`: the sha256 of the .wasm), or not the bytes written."""
    try:
        stamp = json.loads(stamp_of(artifact).read_text())
        written, source, version, made_for = stamp["sha256"], stamp["component"], stamp["wasmtime"], stamp["target"]
    except FileNotFoundError:
        return "no stamp beside it"
    except (OSError, ValueError, KeyError, TypeError):
        return "its stamp is unreadable"
    if version != WASMTIME_VERSION:
        return f"compiled by wasmtime {version}, this is wasmtime {WASMTIME_VERSION}"
    if target is not None and made_for != target:
        return f"compiled for {made_for}, this is {target}"
    if component is not None and source != component:
        return "compiled from another component"
    return None if file_sha256(artifact) == written else "its bytes do not match its checksum"


def stamped_sha256(artifact: Path) -> str:
    """The sha256 its stamp gives an artifact (once `problem_with` passed it: its bytes' own)."""
    return str(json.loads(stamp_of(artifact).read_text())["sha256"])


def write_artifact(artifact: Path, data: bytes, component: str, target: str) -> None:
    """The artifact, then its stamp; a crash between the two leaves no stamp: compiled again."""
    stamp_of(artifact).unlink(missing_ok=True)
    write_atomic(artifact, data)
    stamp = {"sha256": hashlib.sha256(data).hexdigest(), "component": component, "wasmtime": WASMTIME_VERSION,
             "target": target}
    write_atomic(stamp_of(artifact), (json.dumps(stamp, indent=2) + "\n").encode())


def child_env() -> dict[str, str]:
    """The environment of a child that runs this very edgefn (a compile, a trial load)."""
    return {**os.environ, "RUST_BACKTRACE": "0", "PYTHONPATH": os.pathsep.join(
        [str(Path(edgefn.__file__).parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}


def compile_in_child(wasm: Path, artifact: Path, target: str | None = None) -> None:
    """Compile `wasm` into `artifact` in a child process, for this CPU or for `target`; raises BuildError
    for a bad component or a target this wasmtime cannot compile for, OSError (ENOSPC, ...) when the
    artifact could not be written."""
    done = subprocess.run([sys.executable, "-m", "edgefn.functions.compile", str(wasm), str(artifact),
                           *([target] if target else [])], capture_output=True, text=True, env=child_env())
    # wasmtime aborts the process (a Rust panic) when its build lacks the target's code generator.
    if done.returncode == NOT_THIS_TARGET or "Support for this target is disabled" in done.stderr:
        raise BuildError(f"{wasm}: this wasmtime ({WASMTIME_VERSION}, {host_target()}) cannot compile for "
                         f"{target}: compile that target on a {target} machine (or an emulated one) with "
                         f"`edgefn fn build --target {target}`")
    reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    if done.returncode == NOT_WRITTEN:
        raise OSError(reason)
    if done.returncode != 0:
        raise BuildError(f"{wasm}: {reason}")


def main(argv: list[str]) -> int:
    wasm, artifact = Path(argv[0]), Path(argv[1])
    target = argv[2] if len(argv) > 2 else None
    if target is not None and target not in TARGETS:
        print(f"unknown target {target} (known: {', '.join(TARGETS)})", file=sys.stderr)
        return NOT_THIS_TARGET
    try:
        data = wc.Component.from_file(engine(target), str(wasm)).serialize()
    except wasmtime.WasmtimeError as exc:
        print(f"not a loadable component: {' '.join(str(exc).split())}", file=sys.stderr)
        return NOT_A_COMPONENT
    try:
        write_artifact(artifact, data, file_sha256(wasm), target or host_target())
    except OSError as exc:
        print(f"cannot write {artifact.name}: {exc.strerror or exc}", file=sys.stderr)
        return NOT_WRITTEN
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
