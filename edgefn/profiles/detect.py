"""Which device profile fits this machine: every profile's match rules scored against what the machine says.

What is read, all relative to `root` (so a test can hand in a fake tree):

- proc/device-tree/model and proc/device-tree/compatible (ARM boards; NUL-terminated on real devices),
- etc/nv_tegra_release (Jetson Linux),
- proc/cpuinfo (`field : value` lines),
- paths that exist only where an accelerator's driver is loaded (dev/apex_0, dev/nvhost-ctrl-gpu, ...).

A profile's score is the sum of the scores of its rules that hold. The highest score at or above the
profile's min_score wins (ties: the higher priority, then the name). When none reaches it, the generic
profile of the machine's arch is used, and the evidence says so. A profile made for another arch never wins.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefn.errors import ProfileError
from edgefn.profiles.schema import CpuinfoRule, ModelRule, PathRule, Profile, Rule, TegraReleaseRule, load_profiles

_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64", "armv8l": "aarch64"}


@dataclass(frozen=True)
class Detection:
    """The profile chosen, why (in words, one fact per line), and whether it is the generic fallback."""

    profile: Profile
    evidence: list[str]
    fallback: bool


@dataclass(frozen=True)
class _Facts:
    """What the machine under `root` says about itself; None where it says nothing."""

    root: Path
    model: str | None
    compatible: list[str]
    tegra_release: str | None
    cpuinfo: dict[str, list[str]]

    @classmethod
    def read(cls, root: Path) -> _Facts:
        compatible = _read(root / "proc/device-tree/compatible")
        return cls(root, _clean(_read(root / "proc/device-tree/model")),
                   [c for c in (compatible or "").split("\0") if c],
                   _read(root / "etc/nv_tegra_release"), _cpuinfo(_read(root / "proc/cpuinfo") or ""))

    def holds(self, rule: Rule) -> str | None:
        """Why `rule` holds here, in words; None when it does not."""
        if isinstance(rule, PathRule):
            return f"{rule.path} exists" if _exists(self.root / rule.path) else None
        if isinstance(rule, ModelRule | TegraReleaseRule):  # one text, shown once at the top of the evidence
            what, text = ("device-tree model", self.model) if isinstance(rule, ModelRule) \
                else ("nv_tegra_release", self.tegra_release)
            return f"{what} contains {rule.contains!r}" if rule.contains in (text or "") else None
        what, values = (f"cpuinfo {rule.field}", self.cpuinfo.get(rule.field, [])) if isinstance(rule, CpuinfoRule) \
            else ("device-tree compatible", self.compatible)
        hit = next((v for v in values if rule.contains in v), None)
        if hit is None:
            return None
        return f"{what} is {hit!r}" if hit == rule.contains else f"{what} {hit!r} contains {rule.contains!r}"


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:  # missing, a folder, no permission: the machine says nothing there
        return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. under /sys/kernel/debug without permission
        return False


def _clean(text: str | None) -> str | None:
    """A device-tree string without its trailing NUL (and any whitespace); None when there is none."""
    if text is None:
        return None
    return text.replace("\0", " ").strip() or None


def _cpuinfo(text: str) -> dict[str, list[str]]:
    """/proc/cpuinfo as field -> the distinct values it has (one per core on ARM)."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values = fields.setdefault(key.strip(), [])
            if value.strip() not in values:
                values.append(value.strip())
    return fields


def machine_arch(root: Path = Path("/"), cpuinfo: dict[str, list[str]] | None = None) -> tuple[str | None, str]:
    """The arch of the machine under `root` ("x86_64", "aarch64", another name, or None) and where it came from:
    platform.machine() for the running machine ("/"), else hints in `root`/proc/cpuinfo."""
    if Path(root).resolve() == Path("/"):
        machine = platform.machine().lower()
        return _MACHINES.get(machine, machine), f"platform.machine() is {machine!r}"
    fields = cpuinfo if cpuinfo is not None else _cpuinfo(_read(Path(root) / "proc/cpuinfo") or "")
    if "vendor_id" in fields or "cpu family" in fields:
        return "x86_64", "proc/cpuinfo has x86 fields (vendor_id, cpu family)"
    if "8" in fields.get("CPU architecture", []):
        return "aarch64", "proc/cpuinfo says CPU architecture: 8"
    return None, "proc/cpuinfo gives no hint of the arch"


def _score(profile: Profile, facts: _Facts) -> tuple[int, list[str]]:
    score, why = 0, []
    for rule in profile.match.rules:
        reason = facts.holds(rule)
        if reason is not None:
            score += rule.score
            why.append(f"{profile.name}: {rule.score:+d} {reason}")
    return score, why


def detect(root: Path = Path("/"), profiles: Mapping[str, Profile] | None = None) -> Detection:
    """The profile of the machine under `root` (default: this one), with the evidence for it.

    `profiles` defaults to load_profiles(). Raises ProfileError when `root` is not a folder, when a profile
    file does not validate, or when nothing matches and there is no generic profile for the machine's arch
    (a 32-bit ARM system: edgefn's runtimes have no wheels for it)."""
    root = Path(root)
    if not root.is_dir():
        raise ProfileError(f"{root}: no such folder to detect the device under")
    profiles = load_profiles() if profiles is None else profiles
    facts = _Facts.read(root)
    evidence = [f"proc/device-tree/model: {facts.model!r}" if facts.model else "proc/device-tree/model: absent"]
    if facts.tegra_release:
        evidence.append(f"etc/nv_tegra_release: {facts.tegra_release.splitlines()[0]!r}")
    arch, arch_source = machine_arch(root, facts.cpuinfo)  # cpuinfo read once
    candidates: list[tuple[int, int, str]] = []
    for profile in profiles.values():
        if profile.generic:
            continue
        score, why = _score(profile, facts)
        evidence += why
        if not why:
            continue
        if arch is not None and profile.arch != arch:
            evidence.append(f"{profile.name}: passed over, it is for {profile.arch} and this is {arch}")
        elif score < profile.match.min_score:
            evidence.append(f"{profile.name}: score {score}, below its min_score {profile.match.min_score}")
        else:
            candidates.append((score, profile.match.priority, profile.name))
    if candidates:
        score, _, name = min(candidates, key=lambda c: (-c[0], -c[1], c[2]))
        evidence.append(f"{name}: chosen, score {score}")
        return Detection(profiles[name], evidence, fallback=False)
    return _fallback(profiles, arch, arch_source, evidence)


def _fallback(profiles: Mapping[str, Profile], arch: str | None, arch_source: str, evidence: list[str]) -> Detection:
    evidence.append(f"no device profile matched; arch: {arch or 'unknown'} ({arch_source})")
    generic = next((p for p in profiles.values() if p.generic and p.arch == arch), None)
    if generic is None:
        have = ", ".join(f"{p.name} ({p.arch})" for p in profiles.values() if p.generic) or "none"
        raise ProfileError(f"no device profile matches, and there is no generic profile for arch "
                           f"{arch or 'unknown'} ({arch_source}; generic profiles: {have})")
    evidence.append(f"{generic.name}: chosen, the generic profile of {arch}")
    return Detection(generic, evidence, fallback=True)
