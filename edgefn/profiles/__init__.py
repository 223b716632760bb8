"""Device profiles: what a kind of device has and prefers, which kind this machine is, and how it is doing.

    profiles = load_profiles()                   # the shipped device_profiles/*.toml, by name
    found = detect()                             # Detection(profile, evidence, fallback) for this machine
    chain = found.profile.delegates_for("onnxruntime")   # [DelegateSpec(name="tensorrt", provider=...), ...]
    order = found.profile.variant_preference     # e.g. ["fp16", "fp32", "int8"] on a Jetson
    now = pressure(found.profile)                # Pressure(thermal="ok", memory="low", ...)

The data lives in the repository's `device_profiles/` (see its README section "Device profiles").
"""

from edgefn.profiles.detect import Detection, detect, machine_arch
from edgefn.profiles.schema import (
    BACKEND_FORMATS,
    SHIPPED,
    DelegateSpec,
    Profile,
    get_profile,
    load_profiles,
    read_profile,
)
from edgefn.profiles.sensors import Memory, Pressure, ThermalZone, pressure, read_memory, read_thermal

__all__ = [
    "BACKEND_FORMATS",
    "SHIPPED",
    "DelegateSpec",
    "Detection",
    "Memory",
    "Pressure",
    "Profile",
    "ThermalZone",
    "detect",
    "get_profile",
    "load_profiles",
    "machine_arch",
    "pressure",
    "read_memory",
    "read_profile",
    "read_thermal",
]
