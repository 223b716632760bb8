"""The fleet protocol: what a device agent, the operator's CLI and the fleet server say to each other,
and the words the CLI and the server's page both use to show it.

Routes (JSON unless said otherwise; see docs/fleet.md for the whole contract):

    POST /fleet/v1/devices/{id}/report     DeviceReport -> Desired   (registers on first report)
    GET  /fleet/v1/devices/{id}/desired    -> Desired, ETag; If-None-Match -> 304
    GET  /fleet/v1/devices                 -> {"devices": [Device...]}
    POST /fleet/v1/publish                 multipart: the bundle and the TUF metadata that signs it
    GET  /fleet/v1/bundles                 -> {"bundles": [BundleRecord...]}
    POST /fleet/v1/rollouts                RolloutRequest -> Rollout
    GET  /fleet/v1/rollouts[/{id}]         -> {"rollouts": [Rollout...]} / Rollout
    POST /fleet/v1/rollouts/{id}/{pause|resume|abort} -> Rollout
    GET  /tuf/metadata/{file}, /tuf/targets/{file}      the TUF repository (python-tuf's ngclient reads it)
"""

from __future__ import annotations

import re
from typing import Literal

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, Field, field_validator

API = "/fleet/v1"
METADATA_PATH = "/tuf/metadata/"
TARGETS_PATH = "/tuf/targets/"

# What the device agent is doing; the steps of an update in the order they happen.
UPDATE_STEPS = ("downloading", "verifying", "compiling", "activating", "checking", "reporting")
DeviceState = Literal["idle", "downloading", "verifying", "compiling", "activating", "checking", "active",
                      "failed", "rolled-back"]
RolloutState = Literal["running", "paused", "halted", "aborted", "done"]
WaveState = Literal["pending", "installing", "soaking", "passed", "failed"]
GateMetric = Literal["error_rate", "p99_ms", "install_failures"]


def parse_version(text: str) -> Version:
    """A bundle version (PEP 440, e.g. 1.4.0); ordered, so a device can refuse an older one."""
    try:
        return Version(text)
    except InvalidVersion:
        raise ValueError(f"{text!r} is not a version (expected e.g. 1.4.0)") from None


def target_name(bundle: str, version: str) -> str:
    """The bundle's name in the TUF repository's targets."""
    return f"{bundle}-{version}.bundle.tar"


class GateRule(BaseModel):
    metric: GateMetric
    op: Literal["<", "<="]
    limit: float

    def passes(self, value: float | None) -> bool:
        if value is None:  # nothing measured yet counts as passing; install failures are always counted
            return True
        return value < self.limit if self.op == "<" else value <= self.limit

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}"


_RULE = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|<)\s*([0-9.eE+-]+)\s*$")


def parse_gate(text: str) -> list[GateRule]:
    """'error_rate<0.01,p99_ms<50' -> rules; a clear ValueError for anything else."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _RULE.match(part)
        if not m:
            raise ValueError(f"gate rule {part!r}: expected METRIC<VALUE, e.g. error_rate<0.01 or p99_ms<50")
        metric, op, limit = m.groups()
        if metric not in ("error_rate", "p99_ms", "install_failures"):
            raise ValueError(f"gate rule {part!r}: unknown metric {metric!r} "
                             "(error_rate, p99_ms, install_failures)")
        try:
            rules.append(GateRule(metric=metric, op=op, limit=float(limit)))
        except ValueError:
            raise ValueError(f"gate rule {part!r}: {limit!r} is not a number") from None
    return rules


class Health(BaseModel):
    """What a device measured of its active version since it was activated."""

    events: int = 0
    errors: int = 0
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.events if self.events else None


class DeviceReport(BaseModel):
    """POST by the agent at start, at every update step and every poll; registers the device."""

    group: str
    state: DeviceState
    bundle: str | None = None  # what is active on the device (None: nothing from the fleet yet)
    version: str | None = None
    rollout: int | None = None  # the rollout the state refers to
    target_version: str | None = None  # the version being installed or refused
    detail: str = ""  # why it failed or rolled back, in words
    health: Health = Field(default_factory=Health)
    agent: str = ""


class Desired(BaseModel):
    """What a device should run. bundle None: nothing from the fleet (run the local functions)."""

    device_id: str
    bundle: str | None = None
    version: str | None = None
    target: str | None = None  # its TUF target name
    rollout: int | None = None
    gate: list[GateRule] = Field(default_factory=list)  # the device rolls itself back past it
    soak_s: float = 0.0


class Device(BaseModel):
    id: str
    group: str
    state: DeviceState
    bundle: str | None = None
    version: str | None = None
    desired_version: str | None = None
    rollout: int | None = None
    detail: str = ""
    health: Health = Field(default_factory=Health)
    last_seen: float  # unix seconds


class BundleRecord(BaseModel):
    name: str
    version: str
    target: str
    sha256: str
    size: int
    published: float


class RolloutRequest(BaseModel):
    bundle: str
    version: str
    group: str
    canary: int = Field(default=1, ge=0)
    waves: list[float] = Field(default_factory=lambda: [100.0])  # cumulative % of the group
    gate: list[GateRule] = Field(default_factory=list)
    soak_s: float = Field(default=30.0, ge=0)
    wave_timeout_s: float = Field(default=600.0, gt=0)  # a wave not healthy by then halts the rollout

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: list[float]) -> list[float]:
        if not waves or any(not 0 < w <= 100 for w in waves) or waves != sorted(waves) or waves[-1] != 100:
            raise ValueError("waves are rising percentages of the group ending at 100, e.g. 10,50,100")
        return waves


class Wave(BaseModel):
    name: str  # "canary", "wave 1", ...
    devices: list[str]
    state: WaveState = "pending"
    healthy: int = 0
    gate_values: dict[str, float | None] = Field(default_factory=dict)
    soak_started: float | None = None


class Rollout(BaseModel):
    id: int
    bundle: str
    version: str
    group: str
    state: RolloutState
    waves: list[Wave]
    current_wave: int
    gate: list[GateRule]
    soak_s: float
    reason: str = ""  # why it halted or was aborted
    rolled_back: bool = False
    created: float
    updated: float


# ---- the words the operator's CLI and the fleet page both show -----------------------------------
