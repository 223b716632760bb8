"""The device's state now: its temperatures, its free memory, and the pressure they add up to against its
profile's limits (for the capacity module's local-or-cloud decision).

Everything is read under `root` (a fake tree in tests). A file that is missing or cannot be read means
"not available", never an error: a Jetson's cv*-thermal zones answer EAGAIN, a disabled zone reads empty,
a container may see no /sys at all.

- Thermal zones: sys/class/thermal/thermal_zone*/{type,temp}, in milli-°C. Their types name the sensor:
  "cpu-thermal" on a Raspberry Pi, "CPU-therm"/"GPU-therm" on a Jetson Nano, "cpu-thermal"/"gpu-thermal"/
  "tj-thermal" on a Jetson Orin, "soc-thermal"/"npu-thermal" on an RK3588, "x86_pkg_temp" on Intel.
- A Coral Edge TPU's own sensor, sys/class/apex/apex_N/temp (milli-°C), as a zone of type "edgetpu".
- Memory: MemTotal and MemAvailable of proc/meminfo (on a Jetson the GPU's memory is this same memory).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgefn.profiles.schema import Profile

ThermalState = Literal["ok", "throttle", "critical", "unknown"]
MemoryState = Literal["ok", "low", "unknown"]


@dataclass(frozen=True)
class ThermalZone:
    zone: str  # "thermal_zone0", or "apex_0" for an Edge TPU
    type: str  # the kernel's name for the sensor: "cpu-thermal", "GPU-therm", "edgetpu", ...
    celsius: float


@dataclass(frozen=True)
class Memory:
    total_mb: int
    available_mb: int


@dataclass(frozen=True)
class Pressure:
    """How hot and how short of memory the device is, against its profile's limits."""

    thermal: ThermalState  # "unknown": none of the profile's zones could be read
    memory: MemoryState  # "unknown": no proc/meminfo
    hottest: ThermalZone | None  # the hottest of the zones that count
    mem: Memory | None
    reasons: list[str] = field(default_factory=list)  # one line per state that is not "ok"

    @property
    def ok(self) -> bool:
        """Nothing says the device is hot or short of memory (what cannot be read does not count)."""
        return self.thermal in ("ok", "unknown") and self.memory in ("ok", "unknown")


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:  # missing, EAGAIN (a powered-down Orin CV cluster), EINVAL (a Wi-Fi chip that is off)
        return None


def _milli_celsius(path: Path) -> float | None:
    text = _text(path)
    try:
        value = int(text) / 1000 if text else None
    except ValueError:
        return None
    # Out of any sensor's range: a zone that reports an error code or an unset value, not a temperature.
    return value if value is not None and -60 <= value <= 250 else None


def _zone_number(path: Path) -> int:
    digits = re.sub(r"\D", "", path.name)
    return int(digits) if digits else -1


def read_thermal(root: Path = Path("/")) -> list[ThermalZone]:
    """Every thermal zone (and Edge TPU) under `root` that reads a temperature now; [] where there is none."""
    zones = []
    for folder in sorted(Path(root).glob("sys/class/thermal/thermal_zone*"), key=_zone_number):
        celsius = _milli_celsius(folder / "temp")
        if celsius is not None:
            zones.append(ThermalZone(folder.name, _text(folder / "type") or folder.name, celsius))
    for folder in sorted(Path(root).glob("sys/class/apex/apex_*"), key=_zone_number):
        celsius = _milli_celsius(folder / "temp")
        if celsius is not None:
            zones.append(ThermalZone(folder.name, "edgetpu", celsius))
    return zones


def read_memory(root: Path = Path("/")) -> Memory | None:
    """MemTotal and MemAvailable of `root`/proc/meminfo in MB; None where it cannot be read."""
    values: dict[str, int] = {}
    for line in (_text(Path(root) / "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        number = rest.split()[0] if rest.split() else ""
        if number.isdigit():
            values[key.strip()] = int(number) // 1024  # kB
    if "MemTotal" not in values:
        return None
    # Kernels before 3.14 have no MemAvailable: free plus page cache is the usual estimate.
    estimate = sum(values.get(key, 0) for key in ("MemFree", "Buffers", "Cached"))
    return Memory(values["MemTotal"], values.get("MemAvailable", estimate))


def pressure(profile: Profile, root: Path = Path("/"), zones: Sequence[ThermalZone] | None = None) -> Pressure:
    """The thermal and memory pressure of the device under `root` against `profile`'s limits (`zones`:
    what `read_thermal(root)` just gave, where the caller has it already)."""
    limits = profile.limits
    wanted = set(limits.thermal.zones)
    counted = [z for z in (read_thermal(root) if zones is None else zones) if not wanted or z.type in wanted]
    hottest = max(counted, key=lambda z: z.celsius, default=None)
    reasons = []
    thermal: ThermalState = "unknown"
    if hottest is not None:
        critical, throttle = limits.thermal.critical_c, limits.thermal.throttle_c
        thermal = "critical" if hottest.celsius >= critical else "throttle" if hottest.celsius >= throttle else "ok"
        if thermal != "ok":
            limit = critical if thermal == "critical" else throttle
            reasons.append(f"{hottest.type} ({hottest.zone}) at {hottest.celsius:g} °C: at or above "
                           f"{thermal}_c {limit:g} °C")
    mem = read_memory(root)
    memory: MemoryState = "unknown"
    if mem is not None:
        memory = "low" if mem.available_mb < limits.memory.min_free_mb else "ok"
        if memory == "low":
            reasons.append(f"{mem.available_mb} MB available: below min_free_mb {limits.memory.min_free_mb} MB")
    return Pressure(thermal, memory, hottest, mem, reasons)
