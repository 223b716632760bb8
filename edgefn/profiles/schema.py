"""What a device profile holds, validated: one TOML file per kind of device in `device_profiles/`.

    [profile]      name (= the file's name), description, arch ("x86_64" | "aarch64"), generic
    [match]        how `detect` recognises the device: scored rules, a minimum score, a priority
    [hardware]     cores, memory_mb, cpu, accelerators
    [delegates]    variant_preference, and the ordered delegate chain per backend
                   (onnxruntime, litert, rknn)
    [limits]       thermal (throttle_c, critical_c, zones) and memory (min_free_mb)
    [capacity]     defaults: instances, queue_bound, latency_budget_ms; memory_budget_mb (what all
                   functions' sandbox instances may hold together)

A file that does not validate raises ProfileError naming the file and the field path, e.g.
`device_profiles/x.toml: delegates.onnxruntime.0.provider: Field required`. Unknown keys are errors,
so a misspelt option never goes unnoticed.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from edgefn.errors import ProfileError, validation_text
from edgefn.tomlfile import read_toml


def _shipped() -> Path:
    """device_profiles/ at the repository's root (a source checkout, `pip install -e .`), else where a wheel
    installs it (pyproject's data-files: <prefix>/share/edgefn/device_profiles, or the user scheme's)."""
    source = Path(__file__).resolve().parents[2] / "device_profiles"
    if source.is_dir():
        return source
    installed = [Path(sysconfig.get_path("data", scheme)) / "share" / "edgefn" / "device_profiles"
                 for scheme in (sysconfig.get_default_scheme(), f"{os.name}_user")]
    return next((folder for folder in (source, *installed) if folder.is_dir()), source)


SHIPPED = _shipped()

Arch = Literal["x86_64", "aarch64"]
Precision = Literal["int8", "fp16", "fp32"]
OptionValue = str | int | float | bool
# Backends by name, and the model format (model.json's "format") each one runs.
BACKEND_FORMATS = {"onnxruntime": "onnx", "litert": "tflite", "rknn": "rknn"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProfileInfo(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str
    arch: Arch
    generic: bool = False
    """The fallback for its arch when no other profile matches; it has no match rules."""


# --- match rules: each adds its score when it holds ------------------------------------------------


class _Rule(_Strict):
    score: int = Field(description="added to the profile's score when the rule holds (negative: counts against)")


class _TextRule(_Rule):
    contains: str = Field(min_length=1)


class ModelRule(_TextRule):
    """/proc/device-tree/model contains `contains` (NUL-terminated on real devices)."""

    source: Literal["model"]


class CompatibleRule(_TextRule):
    """One entry of /proc/device-tree/compatible (a NUL-separated list) contains `contains`."""

    source: Literal["compatible"]


class TegraReleaseRule(_TextRule):
    """/etc/nv_tegra_release (Jetson Linux) contains `contains`."""

    source: Literal["tegra-release"]


class CpuinfoRule(_TextRule):
    """A `field : value` line of /proc/cpuinfo whose value contains `contains`."""

    source: Literal["cpuinfo"]
    field: str = Field(min_length=1)


class PathRule(_Rule):
    """`path` (relative to the root: a device node, a sysfs or device-tree entry) exists."""

    source: Literal["path"]
    path: str = Field(min_length=1, pattern=r"^[^/]")


Rule = Annotated[ModelRule | CompatibleRule | TegraReleaseRule | CpuinfoRule | PathRule, Field(discriminator="source")]


class Match(_Strict):
    rules: list[Rule] = []
    min_score: int = Field(50, ge=1, description="the least total score at which the profile matches")
    priority: int = Field(0, description="breaks a tie between profiles of the same score (higher wins)")


# --- hardware --------------------------------------------------------------------------------------


class Accelerator(_Strict):
    kind: Literal["gpu", "npu", "tpu"]
    name: str
    tops: float | None = Field(None, gt=0, description="peak int8 tera-operations per second, as the vendor states")
    cores: int | None = Field(None, ge=1, description="CUDA cores, NPU cores, ...")
    compute_capability: str | None = Field(None, description="CUDA compute capability (sm_XY as X.Y)")
    device: str | None = Field(None, description="its device node, e.g. /dev/apex_0")


class Hardware(_Strict):
    cores: int = Field(ge=1)
    memory_mb: int = Field(ge=1, description="nominal; read_memory() gives the real figure")
    cpu: str
    accelerators: list[Accelerator] = []


# --- delegates ---------------------------------------------------------------------------------------


class DelegateSpec(_Strict):
    """One step of a backend's delegate chain, tried in order; the same fields for every backend, each backend
    requiring its own (an onnxruntime execution provider, a LiteRT or RKNN library).

    String option values may hold `{state_dir}`: `options_in(state_dir)` fills it in (e.g. TensorRT's engine
    cache lives under the daemon's state dir)."""

    name: str = Field(min_length=1)
    provider: str | None = None  # onnxruntime: the execution provider
    library: str | None = None  # LiteRT external delegate / RKNN runtime: a file name or a path
    builtin: bool = False  # LiteRT: built into the runtime (XNNPACK, the reference kernels)
    requires_variant: str | None = None  # runs only this model variant (compiled for the accelerator)
    options: dict[str, OptionValue] = {}

    def options_in(self, state_dir: Path) -> dict[str, OptionValue]:
        """The options, with `{state_dir}` in string values replaced by `state_dir`."""
        return {k: v.replace("{state_dir}", str(state_dir)) if isinstance(v, str) else v
                for k, v in self.options.items()}


class OnnxDelegateSpec(DelegateSpec):
    provider: str = Field(min_length=1)
    library: None = None
    builtin: Literal[False] = False


class LiteRtDelegateSpec(DelegateSpec):
    provider: None = None

    @model_validator(mode="after")
    def _library_or_builtin(self) -> LiteRtDelegateSpec:
        if (self.library is None) == (not self.builtin):
            raise ValueError("a LiteRT delegate has either a library or builtin = true")
        return self


class RknnDelegateSpec(DelegateSpec):
    library: str = Field(min_length=1)
    provider: None = None
    builtin: Literal[False] = False


class Delegates(_Strict):
    variant_preference: list[Precision] = Field(min_length=1)
    # The order on the CPU delegates, where it is not the accelerator's: a Jetson's GPU wants fp32 (TensorRT
    # makes fp16 of it) while its Cortex-A cores, like any, run int8 fastest. None: variant_preference.
    cpu_variant_preference: list[Precision] | None = Field(default=None, min_length=1)
    onnxruntime: list[OnnxDelegateSpec] = []
    litert: list[LiteRtDelegateSpec] = []
    rknn: list[RknnDelegateSpec] = []

    @model_validator(mode="after")
    def _distinct(self) -> Delegates:
        if len(set(self.variant_preference)) != len(self.variant_preference):
            raise ValueError("variant_preference names a precision twice")
        cpu = self.cpu_variant_preference or []
        if len(set(cpu)) != len(cpu):
            raise ValueError("cpu_variant_preference names a precision twice")
        for backend in BACKEND_FORMATS:
            names = [d.name for d in getattr(self, backend)]
            if len(set(names)) != len(names):
                raise ValueError(f"{backend} names a delegate twice")
        return self


# --- limits and capacity -----------------------------------------------------------------------------


class ThermalLimits(_Strict):
    throttle_c: float = Field(description="at or above: the device is (about to be) throttled")
    critical_c: float = Field(description="at or above: run nothing here that can run elsewhere")
    zones: list[str] = Field([], description="thermal zone types that count (empty: every zone)")

    @model_validator(mode="after")
    def _ordered(self) -> ThermalLimits:
        if self.critical_c <= self.throttle_c:
            raise ValueError("critical_c must be above throttle_c")
        return self


class MemoryLimits(_Strict):
    min_free_mb: int = Field(ge=0, description="MemAvailable below this is memory pressure")


class Limits(_Strict):
    thermal: ThermalLimits
    memory: MemoryLimits


class Capacity(_Strict):
    instances: int = Field(ge=1, description="warm sandbox instances per function")
    queue_bound: int = Field(ge=1, description="events queued per function before hand-off")
    latency_budget_ms: float = Field(gt=0, description="default latency budget of an event")
    memory_budget_mb: int | None = Field(None, ge=1, description="what the sandbox instances of all functions may "
                                         "hold together (measured per instance); no scale-up goes past it "
                                         "(absent: unbounded)")


class Profile(_Strict):
    profile: ProfileInfo
    match: Match = Match()
    hardware: Hardware
    delegates: Delegates
    limits: Limits
    capacity: Capacity
    _source: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _generic_has_no_rules(self) -> Profile:
        if self.profile.generic and self.match.rules:
            raise ValueError("a generic profile has no match rules (it is the fallback for its arch)")
        return self

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def arch(self) -> str:
        return self.profile.arch

    @property
    def generic(self) -> bool:
        return self.profile.generic

    @property
    def source(self) -> Path | None:
        """The file it was read from."""
        return self._source

    @property
    def variant_preference(self) -> list[str]:
        """Model precisions, best first, for the registry's ranking of variants."""
        return list(self.delegates.variant_preference)

    @property
    def cpu_variant_preference(self) -> list[str]:
        """Model precisions, best first, on the CPU delegates (the accelerators' order where none is given)."""
        return list(self.delegates.cpu_variant_preference or self.delegates.variant_preference)

    def delegates_for(self, backend: str) -> list[DelegateSpec]:
        """The delegate chain of a backend ("onnxruntime", "litert", "rknn", or its format: "onnx", "tflite"),
        in the order to try; empty where the profile gives that backend none."""
        name = _BACKEND_OF_FORMAT.get(backend, backend)
        if name not in BACKEND_FORMATS:
            raise ProfileError(f"no backend {backend!r} (known: {', '.join(BACKEND_FORMATS)})")
        return list(getattr(self.delegates, name))


_BACKEND_OF_FORMAT = {fmt: name for name, fmt in BACKEND_FORMATS.items()}
_MESSAGES = {"none_required": "not allowed for this backend"}  # a field another backend's delegates take


def read_profile(path: Path) -> Profile:
    """One profile file, validated; its [profile] name must be the file's name."""
    data = read_toml(path, ProfileError)
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{path}: {validation_text(exc, _MESSAGES)}") from None
    if profile.name != path.stem:
        raise ProfileError(f"{path}: profile.name: {profile.name!r} is not the file's name {path.stem!r}")
    profile._source = path
    return profile


def load_profiles(dirs: Sequence[Path] | None = None) -> dict[str, Profile]:
    """Every `*.toml` profile in `dirs` (default: the shipped device_profiles/), by name, sorted.

    A profile in a later folder replaces one of the same name in an earlier folder, so
    `load_profiles([SHIPPED, Path("my_profiles")])` adds to and overrides the shipped ones.
    At most one generic profile per arch."""
    folders = [SHIPPED] if dirs is None else [Path(d) for d in dirs]
    found: dict[str, Profile] = {}
    for folder in folders:
        if not folder.is_dir():
            raise ProfileError(f"{folder}: no such folder of device profiles")
        for path in sorted(folder.glob("*.toml")):
            profile = read_profile(path)
            found[profile.name] = profile
    _one_generic_per_arch(found.values())
    return dict(sorted(found.items()))


def _one_generic_per_arch(profiles: Iterable[Profile]) -> None:
    seen: dict[str, Profile] = {}
    for p in profiles:
        if p.generic:
            other = seen.setdefault(p.arch, p)
            if other is not p:
                raise ProfileError(f"{p.source}: profile.generic: {other.name} ({other.source}) is already the "
                                   f"generic profile of {p.arch}")


def get_profile(name: str, dirs: Sequence[Path] | None = None) -> Profile:
    """The profile called `name` (see load_profiles for `dirs`), or a ProfileError listing the known ones."""
    profiles = load_profiles(dirs)
    try:
        return profiles[name]
    except KeyError:
        raise ProfileError(f"no device profile named {name!r} (known: {', '.join(profiles) or 'none'})") from None
