"""The README's device steps, as written, in a Debian bookworm arm64 root under qemu-user.

    python tests/arm64/install.py [--cpu cortex-a72] [--cache .cache/arm64] [--no-invoke]

Where tests/arm64/smoke.py installs the aarch64 wheels with the host's pip, this one does what the
README's "On a device" tells a user to do, in a clean clone copied into the root (tracked, and
untracked but not ignored, files): the commands are read from the README's `sh` blocks of that section
(a line starting with `python3 ` or `~/`, its comment dropped, `&&` steps timed one by one) and each
runs in bash, in the clone, emulated on a Pi 4's CPU: the preflight check, `python3 -m venv`, pip
(emulated too, from the package index over the host's network, which qemu-user shares) and `edgefn
profile detect` from the venv. Then the venv's `edgefn service install --root DIR` ("Install as a
service": the unit and /etc/edgefn's files from the installed wheel, the unit starting the venv's
edgefn; no systemd in the root), and, unless --no-invoke, the venv's `edgefn fn invoke` of the digits
function from the component tests/arm64/smoke.py compiled for aarch64 (kept in --cache; made here when
missing), mapped and never compiled again.

The root is Debian's packages a device has: Python with its venv module and the wheels ensurepip
puts in a venv, bash, and ca-certificates (Debian's pip trusts the system's CA bundle). It is unpacked
with mmdebstrap's `extract` variant (no package script runs), so what ca-certificates' script would
have done is done here: its bundle is made from the certificates it ships (and the host's, for a
network that inspects TLS). The venv and pip's cache are made afresh each run, so every run measures
a cold pip install. Needs root, like the smoke. Exit status 0 when
every step worked and said what it should.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

from smoke import (
    BASELINE_CPU,
    DEBIAN_SUITE,
    FIRST_DIGIT,
    REPO,
    STATE,
    SmokeFailure,
    copy_sources,
    log,
    precompiled_component,
    register_binfmt,
    run_as_root,
    run_in_root,
    unpacked_root,
)

ROOT_PACKAGES = ("python3", "python3-venv", "libstdc++6", "bash", "ca-certificates")
CHECKOUT = "/root/src/edgefn"  # where `git clone` would put it, in the home of the user running the steps
VENV = "/root/edgefn"  # the README's ~/edgefn
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"  # where Debian's pip looks
HOST_CA_BUNDLE = Path("/") / CA_BUNDLE
STEP_TIMEOUT = 3600  # pip, emulated, on a busy host
README_STEPS = ("edgefn.preflight", "-m venv", "pip install", "profile detect")  # what the section must hold


def readme_steps() -> list[str]:
    """The commands of the README's "On a device" section, in order, as a user would type them."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## On a device\n")
    section = text[start:text.index("\n## ", start + 1)]
    steps = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command.startswith(("python3 ", "~/")):  # the rest are the output shown beside them
                steps.extend(part.strip() for part in command.split(" && "))
    missing = [kind for kind in README_STEPS if not any(kind in step for step in steps)]
    if missing:
        raise SmokeFailure(f"README.md, On a device: no step with {missing} among {steps}")
    return steps


def install_root(cache: Path) -> Path:
    """The cached root: Debian's packages only (the venv and pip bring the rest, each run)."""
    key = hashlib.sha256(json.dumps([DEBIAN_SUITE, ROOT_PACKAGES, 1]).encode()).hexdigest()[:16]
    return unpacked_root(cache, "install", "arm64", ROOT_PACKAGES, key)


def trust_certificates(root: Path) -> None:
    """update-ca-certificates' work, which the extract variant skips: one bundle of every certificate
    ca-certificates ships (all are enabled by default), and of the host's own bundle: a network that
    inspects TLS (a CI runner's egress proxy) has its CA there, and a device on that network would be
    given it too."""
    certificates = [path.read_text() for path in sorted((root / "usr/share/ca-certificates").rglob("*.crt"))]
    if not certificates:
        raise SmokeFailure("install root: ca-certificates shipped no certificate")
    if HOST_CA_BUNDLE.is_file():
        certificates.append(HOST_CA_BUNDLE.read_text())
    bundle = root / CA_BUNDLE
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_text("".join(text.rstrip("\n") + "\n" for text in certificates))


def fresh_device(root: Path) -> None:
    """The clone, copied anew; no venv and no pip cache yet (a cold install each run); the host's
    resolver and CAs (a device has its own)."""
    for made in (VENV, "/root/.cache/pip"):
        shutil.rmtree(root / made.lstrip("/"), ignore_errors=True)
    copy_sources(root, CHECKOUT)
    shutil.copy(Path("/etc/resolv.conf").resolve(), root / "etc" / "resolv.conf")
    trust_certificates(root)


def run_step(root: Path, cpu: str, command: str) -> tuple[str, str]:
    """One README command in bash, in the clone: its output, and how long it took."""
    return run_in_root(root, cpu, ["/bin/bash", "-c", f"cd {CHECKOUT} && {command}"], timeout=STEP_TIMEOUT)


def check_step(command: str, out: str) -> str:
    """What the step said, checked against what the README promises of it; a one-line summary."""
    lines = out.strip().splitlines()
    if "edgefn.preflight" in command:
        if not lines or lines[-1] != "edgefn can run here.":
            raise SmokeFailure(f"{command}: the preflight check refused the arm64 root:\n{out}")
        return "; ".join(line.split(": ", 1)[1] for line in lines[:-1])
    if "pip install" in command:
        installed = next((line for line in lines if line.startswith("Successfully installed")), "")
        if " edgefn-" not in installed:
            raise SmokeFailure(f"{command}: pip did not say it installed edgefn:\n{out[-3000:]}")
        wanted = ("onnxruntime-", "numpy-", "wasmtime-", "ai-edge-litert-")
        return ", ".join(name for name in installed.split() if name.startswith(wanted))
    if "profile detect" in command:
        if "generic-aarch64" not in out:
            raise SmokeFailure(f"{command}: no aarch64 profile chosen:\n{out}")
        return lines[0].strip()
    return lines[-1] if lines else ""


def check_installed(root: Path, cpu: str) -> None:
    """The venv's edgefn is the installed one (its site-packages), not the clone's."""
    out, _ = run_in_root(root, cpu, [f"{VENV}/bin/python", "-c", "import edgefn; print(edgefn.__file__)"])
    if not out.strip().startswith(f"{VENV}/lib/"):
        raise SmokeFailure(f"the venv imports edgefn from {out.strip()}, not from its site-packages")


def check_service(root: Path, cpu: str) -> str:
    """README "Install as a service": the venv's `edgefn service install --root DIR` (no systemd in the
    root) writes the unit and /etc/edgefn's example files from the installed wheel; the unit starts this
    venv's edgefn."""
    image = "/tmp/service-image"
    shutil.rmtree(root / image.lstrip("/"), ignore_errors=True)
    out, took = run_step(root, cpu, f"{VENV}/bin/edgefn service install --root {image}")
    unit = root / image.lstrip("/") / "etc/systemd/system/edgefn.service"
    env = root / image.lstrip("/") / "etc/edgefn/edgefn.env"
    if not (unit.is_file() and env.is_file() and (env.parent / "config.toml").is_file()):
        raise SmokeFailure(f"{cpu}: service install --root wrote no unit or no /etc/edgefn files:\n{out[-2000:]}")
    if f"ExecStart={VENV}/bin/edgefn run " not in unit.read_text():
        raise SmokeFailure(f"{cpu}: the unit does not start the venv's edgefn:\n{unit.read_text()}")
    if env.stat().st_mode & 0o777 != 0o600:
        raise SmokeFailure(f"{cpu}: edgefn.env is mode {env.stat().st_mode & 0o777:o}, not 600 (it holds secrets)")
    return took


def check_invoke(root: Path, cpu: str, cache: Path) -> str:
    """The venv's `edgefn fn invoke` of the digits function, from the component compiled for aarch64."""
    artifact = precompiled_component(root, cache, src=CHECKOUT, python=(f"{VENV}/bin/python",), env={})
    stamp = artifact.stat().st_mtime_ns
    event = json.dumps({"id": "arm64-1", "pixels": FIRST_DIGIT}).replace(" ", "")
    out, took = run_step(root, cpu, f"{VENV}/bin/edgefn fn invoke examples/functions/digits --models models "
                                          f"--payload '{event}' --fresh --state-dir {STATE}")
    if artifact.stat().st_mtime_ns != stamp or not artifact.exists():
        raise SmokeFailure(f"{cpu}: fn invoke compiled the component again instead of mapping the precompiled one")
    if '"label": 0' not in out.replace("'", '"'):
        raise SmokeFailure(f"{cpu}: fn invoke did not answer label 0:\n{out[-2000:]}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", default=BASELINE_CPU, help=f"qemu CPU model (default {BASELINE_CPU}: a Pi 4)")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "arm64", help="where the root is kept")
    parser.add_argument("--no-invoke", action="store_true", help="the README's steps only")
    args = parser.parse_args()

    def as_written() -> str:
        steps = readme_steps()
        register_binfmt()
        root = install_root(args.cache)
        fresh_device(root)
        for command in steps:
            out, took = run_step(root, args.cpu, command)
            summary = check_step(command, out)
            log(f"{args.cpu}: `{command}` in {took}{': ' + summary if summary else ''}")
        check_installed(root, args.cpu)
        took = check_service(root, args.cpu)
        log(f"{args.cpu}: the venv's `edgefn service install --root DIR` in {took}: the unit starts the venv's edgefn")
        if not args.no_invoke:
            took = check_invoke(root, args.cpu, args.cache)
            log(f"{args.cpu}: the venv's fn invoke (precompiled component, no compile) in {took}: label 0")
        return f"the README's device steps worked as written on {args.cpu}"

    return run_as_root(as_written)

if __name__ == "__main__":
    sys.exit(main())
