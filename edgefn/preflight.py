"""Can edgefn run on this device? Asked before anything is installed.

    python3 -m edgefn.preflight [--device-root DIR]      (from a checkout or an unpacked wheel)

Supported: a 64-bit userland (aarch64 or x86_64), Python >= 3.10, glibc >= 2.34; on a Jetson, JetPack 6.
Not: a 32-bit userland (32-bit Raspberry Pi OS, armv7l: there are no onnxruntime, LiteRT or numpy
wheels for it, and wasmtime's generic wheel fails at import), JetPack 5 (Python 3.8) or JetPack 4
(Jetson Nano, Python 3.6), musl (Alpine). Each finding says what was seen and what to do.

This module is the first thing a device runs, on whatever Python it has: it imports nothing of edgefn,
only the standard library, and its syntax is Python 3.6's (JetPack 4's), so that an old system is told
why rather than shown a SyntaxError. Exit status 0 when every check passed, 1 otherwise.
"""

import argparse
import collections
import os
import platform
import struct
import sys

MIN_PYTHON = (3, 10)
MIN_GLIBC = (2, 34)
MACHINES = ("aarch64", "x86_64")  # the wheels of every dependency exist for these two only
# /etc/nv_tegra_release's "# R<major>" -> JetPack: L4T R32 is JetPack 4, R35 is 5, R36 is 6.
JETPACK_OF_L4T = {32: 4, 34: 5, 35: 5, 36: 6}
MIN_JETPACK = 6

Finding = collections.namedtuple("Finding", "name ok detail")
Facts = collections.namedtuple("Facts", "machine pointer_bits python glibc tegra_release")


def facts_here(device_root="/"):
    """What the checks look at, read from this system (the Jetson release file under device_root)."""
    try:
        with open(os.path.join(device_root, "etc", "nv_tegra_release")) as f:
            tegra = f.readline()
    except OSError:
        tegra = None
    return Facts(machine=platform.machine(), pointer_bits=struct.calcsize("P") * 8,
                 python=tuple(sys.version_info[:3]), glibc=_glibc(), tegra_release=tegra)


def _glibc():
    """glibc's version as a tuple; None on another C library (musl) or none found."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        name = ""
    if not name.startswith("glibc "):
        lib, version = platform.libc_ver()
        name = "glibc " + version if lib == "glibc" and version else ""
    try:
        return tuple(int(part) for part in name.split()[1].split(".")[:2])
    except (IndexError, ValueError):
        return None


def _dotted(version):
    return ".".join(str(part) for part in version)


def check(facts):
    """One Finding per requirement, in the order a person would fix them."""
    findings = []
    machine, bits = facts.machine, facts.pointer_bits
    if bits != 64:
        # A 64-bit kernel under a 32-bit userland reports aarch64 here: the pointer size tells.
        findings.append(Finding("64-bit userland", False, (
            f"this Python is {bits}-bit ({machine}): edgefn needs a 64-bit system; onnxruntime, LiteRT and "
            "numpy publish no 32-bit ARM wheels. On a Raspberry Pi, install the 64-bit Raspberry Pi OS (bookworm).")))
    elif machine not in MACHINES:
        findings.append(Finding("64-bit userland", False,
                                f"{machine} is not supported: edgefn runs on {' and '.join(MACHINES)}"))
    else:
        findings.append(Finding("64-bit userland", True, f"{machine}, 64-bit"))

    python, least = _dotted(facts.python), _dotted(MIN_PYTHON)
    if tuple(facts.python[:2]) < MIN_PYTHON:
        findings.append(Finding("Python", False, f"Python {python} is too old: edgefn needs {least} or newer "
                                "(Raspberry Pi OS bookworm has 3.11, JetPack 6 has 3.10)"))
    else:
        findings.append(Finding("Python", True, f"Python {python}"))

    least = _dotted(MIN_GLIBC)
    if facts.glibc is None:
        findings.append(Finding("glibc", False, f"no glibc found (musl?): edgefn's wheels are built for glibc {least} "
                                "or newer"))
    elif facts.glibc < MIN_GLIBC:
        findings.append(Finding("glibc", False, f"glibc {_dotted(facts.glibc)} is too old: edgefn's wheels need "
                                f"{least} or newer (Debian 12, Ubuntu 22.04)"))
    else:
        findings.append(Finding("glibc", True, f"glibc {_dotted(facts.glibc)}"))

    if facts.tegra_release is not None:  # a Jetson
        jetpack, l4t = jetpack_of(facts.tegra_release), l4t_major(facts.tegra_release)
        if jetpack is None:
            findings.append(Finding("JetPack", False, f"a Jetson whose release does not read as one "
                                    f"({facts.tegra_release.strip()!r}): edgefn needs JetPack {MIN_JETPACK}"))
        elif jetpack < MIN_JETPACK:
            findings.append(Finding("JetPack", False, (
                f"JetPack {jetpack} (L4T R{l4t}) is not supported: its Python and glibc are too old. edgefn needs "
                f"JetPack {MIN_JETPACK} (Ubuntu 22.04, Python 3.10); a Jetson Nano, which stops at JetPack 4, "
                "cannot run it.")))
        else:
            findings.append(Finding("JetPack", True, f"JetPack {jetpack} (L4T R{l4t})"))
    return findings


def l4t_major(tegra_release):
    """42 from "# R42 (release), REVISION: ..."; None when it does not read so."""
    head = (tegra_release or "").lstrip("# ").split(" ", 1)[0]
    return int(head[1:]) if head[:1] == "R" and head[1:].isdigit() else None


def jetpack_of(tegra_release):
    major = l4t_major(tegra_release)
    if major is None:
        return None
    return JETPACK_OF_L4T.get(major, MIN_JETPACK if major > max(JETPACK_OF_L4T) else None)


def report(findings):
    """The findings as lines for a person, and the verdict last."""
    lines = ["{} {}: {}".format("ok  " if f.ok else "FAIL", f.name, f.detail) for f in findings]
    if all(f.ok for f in findings):
        lines.append("edgefn can run here.")
    else:
        lines.append("edgefn cannot run here: {}.".format(", ".join(f.name for f in findings if not f.ok)))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m edgefn.preflight",
                                     description="Can edgefn run on this device? (before it is installed)")
    parser.add_argument("--device-root", default="/", help="read /etc under this folder (default /)")
    args = parser.parse_args(argv)
    findings = check(facts_here(args.device_root))
    for line in report(findings):
        print(line)
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
