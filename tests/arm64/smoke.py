"""The arm64 proof: edgefn on a Debian bookworm arm64 root, under qemu-user pinned to a Pi's CPU.

    python tests/arm64/smoke.py [--cpu cortex-a72] [--cpu cortex-a76] [--cache .cache/arm64]

Runs on an x86-64 (or any) Linux host as root: it chroots, mounts /proc and /dev in a private mount
namespace, and registers qemu's aarch64 interpreter with binfmt_misc where it is not yet (the daemon
and `edgefn fn build` start child processes, and those must run as arm64 too). Needs Debian's
qemu-user-static and mmdebstrap (`make arm64-smoke` installs them).

The root is unpacked from Debian's arm64 packages (mmdebstrap's `extract` variant: no package script
runs, emulated or not) and the aarch64 wheels of edgefn's dependencies are installed into it from the
package index by the host's pip. It is cached under --cache, keyed by what goes into it; the sources
are copied in afresh each run. The CPU model comes through QEMU_CPU, which every emulated child
inherits; each run checks the auxiliary vector's HWCAP to see that the pin took.

For each CPU: the imports and `edgefn profile detect`; `edgefn model bench` on the ONNX and LiteRT
variants of `digits`; `edgefn fn invoke` of the digits function from a component compiled once for
aarch64 beforehand (on the oldest CPU), mapped and never compiled again; and `edgefn run`
answering real digits through the host's mosquitto (qemu-user shares the host's network), every one
answered and none wrong-labelled beyond the model's own accuracy. Exit status 0 when all passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the host side runs this checkout's edgefn too (broker, build, cross-compile)

# The root: Python and the C++ runtime the native wheels link against. Nothing else is needed to
# run edgefn (no shell, no coreutils): the host's chroot starts the emulated Python directly.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
ROOT_PACKAGES = ("python3", "libstdc++6")
ARMHF_PACKAGES = ("python3",)
PYTHON_VERSION = "3.11"  # bookworm's
# Every manylinux tag bookworm's glibc (2.36) takes that aarch64 wheels are published under.
WHEEL_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_24_aarch64",
                   "manylinux_2_27_aarch64", "manylinux_2_28_aarch64", "manylinux_2_31_aarch64",
                   "manylinux_2_34_aarch64", "manylinux_2_35_aarch64", "manylinux_2_36_aarch64")
DEPS = "/opt/edgefn-deps"  # the wheels, installed by the host's pip --target
SRC = "/src"  # this checkout's tracked and untracked (not ignored) files
STATE = "/var/lib/edgefn-smoke"
BASELINE_CPU = "cortex-a72"  # ARMv8.0-A: what every 64-bit Pi runs
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_BINFMT_DIR = Path("/usr/lib/binfmt.d")  # Debian's qemu-user-static puts its registrations here

HWCAP_ATOMICS, HWCAP_ASIMDDP = 1 << 8, 1 << 20  # ARMv8.1 LSE, ARMv8.2 dot product: an A76 has both, an A72 neither
EXPECTED_HWCAP = {"cortex-a72": (0, HWCAP_ATOMICS | HWCAP_ASIMDDP),  # (must have, must lack)
                  "cortex-a76": (HWCAP_ATOMICS | HWCAP_ASIMDDP, 0)}
BENCH_VARIANTS = {"fp32": "onnx", "int8": "onnx", "tflite-fp32": "tflite", "tflite-int8": "tflite"}
RUN_EVENTS = 40
FIRST_DIGIT = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
               0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0,
               0]  # the first of scikit-learn's digits: a 0
EMULATED_TIMEOUT_MS = 30000


class SmokeFailure(Exception):
    pass


def log(message: str) -> None:
    print(f"[arm64] {message}", flush=True)


def runtime_requirements() -> list[str]:
    """edgefn's own dependencies (no extras: a device installs none), from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def root_key() -> str:
    inputs = json.dumps([DEBIAN_SUITE, ROOT_PACKAGES, PYTHON_VERSION, WHEEL_PLATFORMS, runtime_requirements(), 1])
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]


def unpacked_root(cache: Path, kind: str, arch: str, packages: tuple[str, ...], key: str,
                  finish: Callable[[Path], None] | None = None) -> Path:
    """The root `<kind>-<key>` in the cache: Debian's `packages` for `arch` unpacked (mmdebstrap's
    extract variant), then `finish`ed. Made when missing; older roots of that kind are removed."""
    root = cache / f"{kind}-{key}"
    if (root / ".complete").exists():
        log(f"root {root.name}: cached")
        return root
    for old in cache.glob(f"{kind}-*"):
        shutil.rmtree(old)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    subprocess.run(["mmdebstrap", "--quiet", "--mode=root", "--variant=extract", f"--arch={arch}",
                    f"--include={','.join(packages)}", DEBIAN_SUITE, str(root), DEBIAN_MIRROR], check=True)
    unpacked = time.monotonic()
    if finish:
        finish(root)
    (root / ".complete").write_text(f"{time.time()}\n")
    log(f"root {root.name}: built in {time.monotonic() - started:.0f} s (Debian packages {unpacked - started:.0f} s)")
    return root


def build_root(cache: Path) -> Path:
    """The cached root for the current inputs: Debian's packages, then the aarch64 wheels."""
    def install_wheels(root: Path) -> None:
        requirements = cache / "requirements.txt"
        requirements.write_text("\n".join(runtime_requirements()) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--target", f"{root}{DEPS}", "--only-binary=:all:", "--implementation", "cp",
                        "--python-version", PYTHON_VERSION, "--abi", f"cp{PYTHON_VERSION.replace('.', '')}",
                        *(f"--platform={p}" for p in WHEEL_PLATFORMS), "-r", str(requirements)], check=True)

    return unpacked_root(cache, "root", "arm64", ROOT_PACKAGES, root_key(), install_wheels)


def armhf_root(cache: Path) -> Path:
    """A 32-bit ARM root (Raspberry Pi OS's 32-bit userland is Debian armhf) with Python only: edgefn
    cannot be installed there, and its preflight check must say so."""
    key = hashlib.sha256(json.dumps([DEBIAN_SUITE, ARMHF_PACKAGES]).encode()).hexdigest()[:16]
    return unpacked_root(cache, "armhf", "armhf", ARMHF_PACKAGES, key)


def register_binfmt() -> None:
    """Emulated programs that start programs (the daemon's compile child, pip) need the kernel to
    hand ARM executables to qemu. The F flag (in Debian's conf) makes that work inside the chroot."""
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    for name in ("qemu-aarch64", "qemu-arm"):
        if not (BINFMT / name).exists():
            (BINFMT / "register").write_text((QEMU_BINFMT_DIR / f"{name}.conf").read_text().strip())
        if "enabled" not in (BINFMT / name).read_text():
            raise SmokeFailure(f"binfmt_misc: {name} is registered but disabled")


def copy_sources(root: Path, src: str = SRC) -> None:
    """The mount points; the checkout as git sees it (tracked, and untracked but not ignored), with its
    file times, at `src` in the root: what a clean clone holds."""
    for folder in ("proc", "dev", "tmp", "root"):  # mount points, and homes
        (root / folder).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    dest = root / src.lstrip("/")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.split(b"\0")
    for name in filter(None, names):
        source = REPO / os.fsdecode(name)
        if source.is_file():  # a deleted, not yet committed file is still listed
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def slow_cpu_manifest(function_dir: Path) -> None:
    """Emulation runs a guest 20-50 times slower than the CPU it plays: the digits function's 500 ms
    deadline is raised in the copy, or the first event (the guest's start) would run past it."""
    manifest = function_dir / "edgefn.toml"
    text = manifest.read_text()
    if "timeout_ms = 500\n" not in text:
        raise SmokeFailure(f"{manifest}: no 'timeout_ms = 500' to raise for emulation")
    manifest.write_text(text.replace("timeout_ms = 500\n", f"timeout_ms = {EMULATED_TIMEOUT_MS}\n"))


def precompiled_component(root: Path, cache: Path, src: str = SRC,
                          python: tuple[str, ...] = ("/usr/bin/python3",), env: dict[str, str] | None = None) -> Path:
    """Build the digits component here (componentize-py), then compile it for aarch64 once, in the root
    on the oldest CPU (an artifact built for ARMv8.0 maps on later cores), into the cache the device's
    Runtime reads: every check after it must map it without compiling.

    Both are kept in --cache, keyed by the sources they are built from and the tools' versions: the
    component's bytes differ from one build to the next, so its own hash would never hit. The compile
    runs `python` in the root (with `env`), which must import edgefn.
    Not cross-compiled by the host's wasmtime: the package index's wasmtime builds hold the code
    generator of their own architecture only ("Support for this target is disabled")."""
    import importlib.metadata

    from edgefn.files import file_sha256
    from edgefn.functions.build import build, component_path, sources_stamp, watched_sources
    from edgefn.functions.compile import WASMTIME_VERSION
    from edgefn.functions.manifest import load_manifest

    function_dir = root / src.lstrip("/") / "examples" / "functions" / "digits"
    slow_cpu_manifest(function_dir)
    sources = sorted(watched_sources(function_dir))
    key = hashlib.sha256(json.dumps([[p.name, file_sha256(p)] for p in sources] + [
        importlib.metadata.version("componentize-py"), WASMTIME_VERSION]).encode()).hexdigest()[:16]
    kept = cache / f"component-{key}"
    manifest = load_manifest(function_dir)
    wasm, built_from = component_path(function_dir, manifest), sources_stamp(function_dir, manifest)
    state = root / STATE.lstrip("/") / "components"
    shutil.rmtree(state.parent, ignore_errors=True)
    state.mkdir(parents=True)
    if (kept / ".complete").exists():
        wasm.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kept / wasm.name, wasm)
        shutil.copy(kept / built_from.name, built_from)  # what it was built from: not built again
        for path in kept.iterdir():
            if path.name not in (wasm.name, built_from.name, ".complete"):
                shutil.copy2(path, state / path.name)
        log(f"digits component: built and compiled for aarch64 by an earlier run ({kept.name})")
        return next(state.glob("*.cwasm"))
    started = time.monotonic()
    build(function_dir)
    log(f"digits component: built in {time.monotonic() - started:.1f} s ({wasm.stat().st_size / 1e6:.1f} MB)")
    # Compiled as the device compiles it (sandbox.Runtime.load: in a child process, into its cache,
    # named and checked its way), then mapped there once.
    compile_here = ("import sys; from pathlib import Path; from edgefn.functions.sandbox import Runtime\n"
                    "with Runtime(Path(sys.argv[1])) as runtime: runtime.load(Path(sys.argv[2]))")
    _, took = run_in_root(root, BASELINE_CPU, [*python, "-c", compile_here, "/" + str(state.relative_to(root)),
                                               "/" + str(wasm.relative_to(root))], env=PYTHON_ENV if env is None else env)
    artifact = next(state.glob("*.cwasm"))
    log(f"digits component: compiled for aarch64 on {BASELINE_CPU} in {took} ({artifact.stat().st_size / 1e6:.1f} MB)")
    for old in cache.glob("component-*"):
        shutil.rmtree(old)
    kept.mkdir(parents=True)
    for path in (wasm, built_from, *state.iterdir()):  # the artifact and whatever the cache keeps beside it
        shutil.copy2(path, kept / path.name)
    (kept / ".complete").write_text(f"{time.time()}\n")
    return artifact


def in_root(root: Path, cpu: str | None, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """A command running `argv` in the root on `cpu`, in a clean environment (plus `env`), with /proc and
    /dev mounted in a mount namespace of its own (gone with the process, so nothing is left mounted).
    exec keeps one pid: a signal to it reaches the emulated program. Not /sys: the host's CPU topology
    there, beside the host's x86 /proc/cpuinfo, makes onnxruntime's cpuinfo crash at import (SIGSEGV) on
    an A72; without it, cpuinfo gives up with a warning, and onnxruntime runs."""
    variables = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **({"QEMU_CPU": cpu} if cpu else {}), "HOME": "/root",
                 "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8", "COLUMNS": "200", **(env or {})}
    script = ('mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && '
              f'exec env -i {" ".join(shlex.quote(f"{k}={v}") for k, v in variables.items())} chroot "$1" "${{@:2}}"')
    return ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "bash", str(root), *argv]


PYTHON_ENV = {"PYTHONPATH": f"{SRC}:{DEPS}"}  # the smoke's edgefn: this checkout, and the wheels beside it


def emulated(root: Path, cpu: str | None, *argv: str) -> list[str]:
    """`python3 argv...` in the root on `cpu`, importing the checkout at SRC and the wheels at DEPS."""
    return in_root(root, cpu, ["/usr/bin/python3", *argv], PYTHON_ENV)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_emulated(root: Path, cpu: str | None, *argv: str, timeout: float = 900,
                 expect: int = 0) -> tuple[str, str]:
    """`python3 argv...` run in the root (see emulated): its output, and how long it took."""
    return run_in_root(root, cpu, ["/usr/bin/python3", *argv], PYTHON_ENV, timeout=timeout, expect=expect)


def run_in_root(root: Path, cpu: str | None, argv: list[str], env: dict[str, str] | None = None,
                timeout: float = 900, expect: int = 0) -> tuple[str, str]:
    """Its output, and how long it took: wall clock and CPU (the CPU figure holds on a busy host)."""
    started, cpu_before = time.monotonic(), children_cpu()
    done = subprocess.run(in_root(root, cpu, argv, env), capture_output=True, text=True, timeout=timeout)
    took = f"{time.monotonic() - started:.1f} s ({children_cpu() - cpu_before:.1f} s CPU)"
    if done.returncode != expect:
        raise SmokeFailure(f"{' '.join(argv)} on {cpu}: exit status {done.returncode} "
                           f"({signal.Signals(-done.returncode).name if done.returncode < 0 else 'error'})\n"
                           f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout, took


def check_imports(root: Path, cpu: str) -> str:
    probe = (
        "import struct, onnxruntime, wasmtime, numpy, edgefn.daemon\n"
        "from ai_edge_litert.interpreter import Interpreter\n"
        "aux = open('/proc/self/auxv', 'rb').read()\n"
        "hwcap = dict(struct.iter_unpack('QQ', aux)).get(16, 0)\n"
        "print(hwcap, onnxruntime.__version__, numpy.__version__)\n")
    out, took = run_emulated(root, cpu, "-c", probe)
    hwcap, ort, np_version = out.split()
    must_have, must_lack = EXPECTED_HWCAP.get(cpu, (0, 0))
    if (int(hwcap) & must_have) != must_have or int(hwcap) & must_lack:
        raise SmokeFailure(f"{cpu}: HWCAP {int(hwcap):#x} is not that CPU's: the pin did not take")
    log(f"{cpu}: imports in {took} (onnxruntime {ort}, numpy {np_version}, HWCAP {int(hwcap):#x})")
    out, took = run_emulated(root, cpu, "-m", "edgefn", "profile", "detect")
    if "generic-aarch64" not in out:
        raise SmokeFailure(f"{cpu}: profile detect chose no aarch64 profile:\n{out}")
    log(f"{cpu}: profile detect in {took}: {out.splitlines()[0].strip()}")
    return ort


def check_preflight(root: Path, cpu: str) -> None:
    out, took = run_emulated(root, cpu, "-m", "edgefn.preflight")
    if out.splitlines()[-1] != "edgefn can run here.":
        raise SmokeFailure(f"{cpu}: the preflight check refused the arm64 root:\n{out}")
    log(f"{cpu}: preflight in {took}: " + "; ".join(line.split(": ", 1)[1] for line in out.splitlines()[:-1]))


def check_32_bit_refused(cache: Path) -> None:
    """The preflight check, run by a 32-bit Python on ARM: refused, and told why."""
    root = armhf_root(cache)
    (root / "proc").mkdir(exist_ok=True)
    (root / "dev").mkdir(exist_ok=True)
    package = root / SRC.lstrip("/") / "edgefn"
    shutil.rmtree(package.parent, ignore_errors=True)
    package.mkdir(parents=True)
    for name in ("__init__.py", "preflight.py"):  # all it needs: it imports nothing else of edgefn
        shutil.copy2(REPO / "edgefn" / name, package / name)
    out, took = run_emulated(root, None, "-m", "edgefn.preflight", expect=1)
    if "FAIL 64-bit userland: this Python is 32-bit (armv7l)" not in out:
        raise SmokeFailure(f"armhf: the preflight check did not refuse a 32-bit userland:\n{out}")
    log(f"armhf: preflight refused in {took}: {out.splitlines()[0]}")


def check_bench(root: Path, cpu: str) -> None:
    variants = [arg for name in BENCH_VARIANTS for arg in ("--variant", name)]
    out, took = run_emulated(root, cpu, "-m", "edgefn", "model", "bench", "digits", "--models", f"{SRC}/models",
                             "--json", "--no-record", *variants)
    report = json.loads(out[out.index("{"):])
    timed = {v["variant"]: v for v in report["variants"] if v.get("latency")}
    missing = [name for name in BENCH_VARIANTS if name not in timed]
    if missing:
        raise SmokeFailure(f"{cpu}: model bench did not time {missing}:\n{out[-2000:]}")
    for name, v in timed.items():
        if v.get("accuracy", 0) < 0.85:
            raise SmokeFailure(f"{cpu}: {name} answers with accuracy {v['accuracy']:.3f}")
    shown = ", ".join(f"{n} {v['latency'][0]['median_ms']:.3f} ms (acc {v['accuracy']:.3f})" for n, v in timed.items())
    log(f"{cpu}: model bench in {took}: batch-1 medians {shown}")


def check_invoke(root: Path, cpu: str, artifact: Path) -> None:
    stamp = artifact.stat().st_mtime_ns
    event = json.dumps({"id": "arm64-1", "pixels": FIRST_DIGIT})
    out, took = run_emulated(root, cpu, "-m", "edgefn", "fn", "invoke", f"{SRC}/examples/functions/digits",
                             "--models", f"{SRC}/models", "--payload", event, "--fresh", "--state-dir", STATE)
    if artifact.stat().st_mtime_ns != stamp or not artifact.exists():
        raise SmokeFailure(f"{cpu}: fn invoke compiled the component again instead of mapping the precompiled one")
    if '"label": 0' not in out.replace("'", '"'):
        raise SmokeFailure(f"{cpu}: fn invoke did not answer label 0:\n{out[-2000:]}")
    log(f"{cpu}: fn invoke (precompiled component, no compile) in {took}")


def check_run(root: Path, cpu: str, artifact: Path) -> None:
    """`edgefn run` in the root, the host's mosquitto on loopback: every digit answered, once."""
    import numpy as np
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefn.demo import _wait_healthy as wait_healthy
    from edgefn.errors import EdgefnError
    from edgefn.mqtt.local_broker import LocalBroker, free_port

    data = np.load(REPO / "models" / "digits" / "validation.npz")
    xs, ys = data["x"][:RUN_EVENTS], data["y"][:RUN_EVENTS]
    answers: dict[str, int] = {}
    errors: list[str] = []
    lock, all_in = threading.Lock(), threading.Event()

    def received(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        with lock:
            if msg.topic.startswith("results/"):
                answers[doc["event_id"]] = doc["label"]
            else:
                errors.append(msg.payload.decode(errors="replace"))
            if len(answers) >= RUN_EVENTS:
                all_in.set()

    metrics = free_port()
    stamp = artifact.stat().st_mtime_ns
    with LocalBroker() as broker, tempfile.TemporaryFile("w+") as daemon_log:
        watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"arm64-watch-{cpu}")
        watcher.on_message = received
        watcher.connect("127.0.0.1", broker.port)
        watcher.subscribe([("results/+/digits", 1), ("edgefn/errors/#", 1)])
        watcher.loop_start()
        started = time.monotonic()
        daemon = subprocess.Popen(emulated(root, cpu, "-m", "edgefn", "run", "--broker", broker.url,
                                           "--functions", f"{SRC}/examples/functions/digits", "--models",
                                           f"{SRC}/models", "--state-dir", STATE, "--metrics-port", str(metrics),
                                           "--client-id", f"arm64-{cpu}", "--no-build"),
                                  stdout=daemon_log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_healthy(metrics, daemon, timeout=300)
            except EdgefnError as exc:
                daemon_log.seek(0)
                raise SmokeFailure(f"{cpu}: {exc}\n{daemon_log.read()[-3000:]}") from None
            healthy = time.monotonic()
            for i, (x, _) in enumerate(zip(xs, ys, strict=True)):
                payload = json.dumps({"id": f"{cpu}-{i}", "pixels": x.tolist()})
                watcher.publish(f"sensors/pi-{cpu}/digits", payload, qos=1)
            answered = all_in.wait(timeout=300)
            done = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            status = daemon.wait(timeout=120)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            watcher.loop_stop()
            watcher.disconnect()
            daemon_log.seek(0)
            output = daemon_log.read()
    if not answered or errors:
        raise SmokeFailure(f"{cpu}: edgefn run answered {len(answers)} of {RUN_EVENTS}, {len(errors)} errors "
                           f"{errors[:3]}\n{output[-3000:]}")
    if status != 0:
        raise SmokeFailure(f"{cpu}: edgefn run exited with status {status} on SIGTERM\n{output[-3000:]}")
    if artifact.stat().st_mtime_ns != stamp or "compiling" in output:
        raise SmokeFailure(f"{cpu}: edgefn run compiled the component\n{output[-3000:]}")
    correct = sum(answers[f"{cpu}-{i}"] == int(y) for i, y in enumerate(ys))
    if correct < 0.85 * RUN_EVENTS:
        raise SmokeFailure(f"{cpu}: edgefn run labelled only {correct} of {RUN_EVENTS} right")
    log(f"{cpu}: edgefn run healthy in {healthy - started:.1f} s, {RUN_EVENTS} digits answered in "
        f"{done - healthy:.1f} s ({correct} right), none lost, exit 0 on SIGTERM")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="append", help="qemu CPU model (repeatable; default cortex-a72 and cortex-a76)")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "arm64", help="where the root is kept")
    args = parser.parse_args()
    cpus = args.cpu or ["cortex-a72", "cortex-a76"]

    def smoke() -> str:
        register_binfmt()
        root = build_root(args.cache)
        copy_sources(root)
        artifact = precompiled_component(root, args.cache)
        check_32_bit_refused(args.cache)
        for cpu in cpus:
            cpu_started = time.monotonic()
            check_imports(root, cpu)
            check_preflight(root, cpu)
            check_bench(root, cpu)
            check_invoke(root, cpu, artifact)
            check_run(root, cpu, artifact)
            log(f"{cpu}: passed in {time.monotonic() - cpu_started:.0f} s")
        return f"passed on {', '.join(cpus)}"

    return run_as_root(smoke)


def run_as_root(checks: Callable[[], str]) -> int:
    """The exit status of `checks`: 0 when they pass (what they return is logged, and how long they
    took), 1 on a SmokeFailure, 2 when not root."""
    if os.geteuid() != 0:
        log("needs root (chroot, mount, binfmt_misc)")
        return 2
    started = time.monotonic()
    try:
        passed = checks()
    except SmokeFailure as exc:
        log(f"FAILED: {exc}")
        return 1
    log(f"{passed} in {time.monotonic() - started:.0f} s")
    return 0

if __name__ == "__main__":
    sys.exit(main())
