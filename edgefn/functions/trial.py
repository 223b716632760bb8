"""A compiled artifact loaded once in a child process before this one maps it.

An artifact is machine code. One damaged past what its stamp can tell (its code zeroed and its checksum
rewritten to match, a miscompile) kills the process that deserializes and instantiates it (SIGSEGV,
SIGILL) before any error can be caught: the daemon would die with every function and nothing in its log.
So an artifact not trusted yet is first deserialized and instantiated in a child, with the engine the
sandbox uses, with WASI and the host's imports as traps (instantiation runs the guest's start code):

    python -m edgefn.functions.trial <artifact.cwasm>

The verdict is remembered in a folder (the compiled-component cache) by the artifact's sha256:
`<sha256>.trusted` once a child loaded it (later starts map it with no child), `<sha256>.crashed`
holding the signal once it killed one (a shipped artifact, which is never removed, is not tried again).
A child that neither loads it nor crashes (wasmtime refuses it, a timeout, killed from outside) gives no
verdict: the artifact is mapped as before (wasmtime's errors are caught) and tried again next time.
Exit status: 0 loaded and instantiated, 1 wasmtime refused it (the reason is the one line on stderr).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from pathlib import Path

import wasmtime
from wasmtime import component as wc

from edgefn.functions import compile as compiler

log = logging.getLogger("edgefn.sandbox")
TRIAL_TIMEOUT_S = 300.0  # generous: the digits component takes ~0.2 s on a laptop, a small board many times that
# A process killed by one of these crashed on the artifact; SIGKILL, SIGTERM came from outside (the OOM killer).
CRASHES = frozenset({signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT, signal.SIGTRAP,
                     signal.SIGSYS})


def crash_of(artifact: Path, sha256: str, verdicts: Path) -> str | None:
    """The signal ("SIGSEGV") that loading `artifact` (whose bytes have this sha256) killed a child with,
    remembered in `verdicts` or found now; None when it may be mapped in this process."""
    trusted, crashed = verdicts / f"{sha256}.trusted", verdicts / f"{sha256}.crashed"
    if trusted.exists():
        return None
    with contextlib.suppress(OSError):
        return crashed.read_text().strip() or "a crash"
    try:
        done = subprocess.run([sys.executable, "-m", "edgefn.functions.trial", str(artifact)], capture_output=True,
                              text=True, env=compiler.child_env(), timeout=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("%s: a trial load did not finish in %.0f s; mapped unchecked", artifact, TRIAL_TIMEOUT_S)
        return None
    if done.returncode < 0 and -done.returncode in CRASHES:
        name = signal.Signals(-done.returncode).name
        _remember(crashed, name)
        return name
    if done.returncode == 0:
        _remember(trusted, "")
    elif done.returncode == 1:  # mapping it here raises the same error, which the sandbox reports
        log.debug("%s: a trial load failed: %s", artifact, done.stderr.strip())
    else:
        log.warning("%s: a trial load gave no verdict (exit status %d); mapped unchecked", artifact, done.returncode)
    return None


def _remember(marker: Path, text: str) -> None:
    """A verdict written; where it cannot be (a read-only cache), the next start tries the artifact again."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(text)
    except OSError as exc:
        log.warning("%s: cannot remember a trial load's verdict (%s)", marker, exc.strerror or exc)


def main(argv: list[str]) -> int:
    engine = compiler.engine()
    try:
        component = wc.Component.deserialize_file(engine, argv[0])
        linker = wc.Linker(engine)
        linker.add_wasip2()
        linker.define_unknown_imports_as_traps(component)
        store = wasmtime.Store(engine)
        store.set_wasi(wasmtime.WasiConfig())  # no stdio, no files: the guest's start code may print
        store.set_epoch_deadline(1 << 62)  # nothing ticks the epoch here: the parent's timeout bounds it
        linker.instantiate(store, component)
    except wasmtime.WasmtimeError as exc:
        print(" ".join(str(exc).split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
