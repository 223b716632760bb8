"""The device as the daemon sees it: its profile (chosen with --profile, else detected from /proc,
/etc and /dev) and its sensors, read every few seconds into the metrics and into the pressure the
planner weighs (a critical temperature or low memory hands work off where it can)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

from edgefn.observe.metrics import Metrics
from edgefn.profiles import Pressure, Profile, detect, get_profile, pressure, read_thermal
from edgefn.profiles.sensors import MemoryState, ThermalState

log = logging.getLogger("edgefn.daemon")
_PRESSURE_STATES = {"thermal": get_args(ThermalState), "memory": get_args(MemoryState)}


def device_profile(name: str | None, device_root: Path, metrics: Metrics) -> Profile:
    """The profile named `name`, else what the device's files say it is; logged with the evidence."""
    if name:
        profile = get_profile(name)
        log.info("device profile %s (chosen with --profile)", profile.name)
    else:
        found = detect(device_root)
        profile = found.profile
        log.info("device profile %s (detected%s): %s", profile.name, ", a fallback" if found.fallback else "",
                 "; ".join(found.evidence))
    metrics.profile.labels(profile.name).set(1)
    return profile


class Sensors:
    """The latest temperatures and free memory, against the profile's limits."""

    def __init__(self, profile: Profile, device_root: Path, metrics: Metrics):
        self.profile, self.device_root, self.metrics = profile, device_root, metrics
        self.now: Pressure | None = None

    def under_pressure(self) -> bool:
        now = self.now
        return now is not None and (now.thermal == "critical" or now.memory == "low")

    def read(self) -> None:
        zones = read_thermal(self.device_root)
        now = pressure(self.profile, self.device_root, zones)
        for zone in zones:
            self.metrics.temperature.labels(zone.type).set(zone.celsius)
        if now.mem is not None:
            self.metrics.memory_available.set(now.mem.available_mb * 1024 * 1024)
        for kind, state in (("thermal", now.thermal), ("memory", now.memory)):
            for value in _PRESSURE_STATES[kind]:
                self.metrics.pressure.labels(kind, value).set(1 if state == value else 0)
        self.now = now

    def health(self) -> dict | None:
        now = self.now
        return {"thermal": now.thermal, "memory": now.memory, "reasons": now.reasons} if now else None
