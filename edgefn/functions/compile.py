"""Compiling a component for this CPU, in a child process, into a verified cache artifact.

Compiling a Python component peaks at ~450 MB; done in the daemon, that peak would stay in its RSS
for good. The child gives it back when it exits, and the daemon only maps the artifact:

    python -m edgefn.functions.compile <component.wasm> <artifact.cwasm>

Each artifact has a sidecar `<artifact>.sha256`, written after it: mapping a damaged artifact can
kill the process (SIGILL, SIGSEGV) before any error can be caught, so one whose bytes do not match
is never mapped. Exit status: 0 written, 1 not a loadable component, 2 could not be written; the
reason is the one line on stderr.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import wasmtime
from wasmtime import component as wc

import edgefn
from edgefn.errors import BuildError
from edgefn.files import file_sha256, write_atomic

NOT_A_COMPONENT, NOT_WRITTEN = 1, 2


def engine() -> wasmtime.Engine:
    """The engine every artifact is compiled for: one compiled with other settings does not map."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    return wasmtime.Engine(config)


def checksum_of(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".sha256")


def problem_with(artifact: Path) -> str | None:
    """Why `artifact` must not be mapped (no checksum, not the bytes written), or None."""
    try:
        expected = checksum_of(artifact).read_text().strip()
    except FileNotFoundError:
        return "no checksum beside it"
    return None if file_sha256(artifact) == expected else "its bytes do not match its checksum"


def write_artifact(artifact: Path, data: bytes) -> None:
    """The artifact, then its sidecar; a crash between the two leaves no sidecar: compiled again."""
    checksum_of(artifact).unlink(missing_ok=True)
    write_atomic(artifact, data)
    write_atomic(checksum_of(artifact), hashlib.sha256(data).hexdigest().encode())


def compile_in_child(wasm: Path, artifact: Path) -> None:
    """Compile `wasm` into `artifact` in a child process; raises BuildError for a bad component and
    OSError (ENOSPC, ...) when the artifact could not be written."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # the child runs this very edgefn
        [str(Path(edgefn.__file__).parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "edgefn.functions.compile", str(wasm), str(artifact)],
                          capture_output=True, text=True, env=env)
    reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    if done.returncode == NOT_WRITTEN:
        raise OSError(reason)
    if done.returncode != 0:
        raise BuildError(f"{wasm}: {reason}")


def main(argv: list[str]) -> int:
    wasm, artifact = Path(argv[0]), Path(argv[1])
    try:
        data = wc.Component.from_file(engine(), str(wasm)).serialize()
    except wasmtime.WasmtimeError as exc:
        print(f"not a loadable component: {' '.join(str(exc).split())}", file=sys.stderr)
        return NOT_A_COMPONENT
    try:
        write_artifact(artifact, data)
    except OSError as exc:
        print(f"cannot write {artifact.name}: {exc.strerror or exc}", file=sys.stderr)
        return NOT_WRITTEN
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
