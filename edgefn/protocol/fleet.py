"""The fleet protocol: what a device agent, the operator's CLI and the fleet server say to each other,
and the words the CLI and the server's page both use to show it.

Routes (JSON unless said otherwise; see docs/fleet.md for the whole contract):

    POST /fleet/v1/devices/{id}/report     DeviceReport -> Desired   (the device's own credential)
    GET  /fleet/v1/devices/{id}/desired    -> Desired, ETag; If-None-Match -> 304   (the same)
    GET  /fleet/v1/devices                 -> {"devices": [Device...]}
    POST /fleet/v1/enrollments             EnrollRequest -> Enrollment (its token, shown once)
    POST /fleet/v1/enrollments/{id}/revoke -> {"device_id", "revoked": true}
    POST /fleet/v1/publish                 multipart: the bundle and the TUF metadata that signs it
    GET  /fleet/v1/bundles                 -> {"bundles": [BundleRecord...]}
    POST /fleet/v1/rollouts                RolloutRequest -> Rollout
    GET  /fleet/v1/rollouts[/{id}]         -> {"rollouts": [Rollout...]} / Rollout
    POST /fleet/v1/rollouts/{id}/{pause|resume|abort} -> Rollout
    DELETE /fleet/v1/devices/{id}          -> {"device_id", "removed": true}   (its row, assignment, credential)
    GET  /fleet/v1/audit[?limit=N&after=ID] -> {"entries": [AuditEntry...]}   (oldest first; append-only)
    GET  /tuf/metadata/{file}, /tuf/targets/{file}      the TUF repository (python-tuf's ngclient reads it)
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, Field, StringConstraints, field_validator, model_validator

API = "/fleet/v1"
METADATA_PATH = "/tuf/metadata/"
TARGETS_PATH = "/tuf/targets/"

# What the device agent is doing; the steps of an update in the order they happen.
UPDATE_STEPS = ("downloading", "verifying", "compiling", "activating", "checking", "reporting")
# clock-skew: the device refused the fleet's metadata as expired while its own clock is off (the server's
# Date says so): the device's problem, never counted as a failed install.
DeviceState = Literal["idle", "downloading", "verifying", "compiling", "activating", "checking", "active",
                      "failed", "rolled-back", "clock-skew"]
RolloutState = Literal["running", "paused", "halted", "aborted", "done"]
WaveState = Literal["pending", "installing", "soaking", "passed", "failed"]
GateMetric = Literal["error_rate", "p99_ms", "install_failures", "accuracy"]
GATE_METRICS: tuple[str, ...] = get_args(GateMetric)

# Bounds of what a device or an operator may send: a report is a few hundred bytes, and the database's
# integer columns are 32 bits.
MAX_COUNTER = 2**31 - 1
MAX_MS = 1e7
MAX_ID = 2**31 - 1
NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"  # device ids, groups, bundle names and versions
Name = Annotated[str, StringConstraints(pattern=NAME)]


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
    """One rule of a rollout's gate: a metric of the wave's devices, bounded above (error_rate<0.01) or,
    for accuracy, below (accuracy>=0.9)."""

    metric: GateMetric
    op: Literal["<", "<=", ">=", ">"]
    limit: float = Field(allow_inf_nan=False)

    def passes(self, value: float | None) -> bool:
        if value is None:  # nothing measured yet counts as passing; install failures are always counted
            return True
        return {"<": value < self.limit, "<=": value <= self.limit, ">=": value >= self.limit,
                ">": value > self.limit}[self.op]

    @model_validator(mode="after")
    def _direction(self) -> GateRule:
        if (problem := _direction_problem(self.metric, self.op)) is not None:
            raise ValueError(problem)
        return self

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}"


def _direction_problem(metric: str, op: str) -> str | None:
    """A gate holds a rollout on what gets worse: errors, latency and failures up, accuracy down."""
    if (metric == "accuracy") == (op in (">=", ">")):
        return None
    return ("accuracy is bounded below: accuracy>=VALUE" if metric == "accuracy"
            else f"{metric} is bounded above: {metric}<VALUE")


_RULE = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|<|>=|>)\s*([0-9.eE+-]+)\s*$")


def parse_gate(text: str) -> list[GateRule]:
    """'error_rate<0.01,p99_ms<50,accuracy>=0.9' -> rules; a clear ValueError for anything else."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _RULE.match(part)
        if not m:
            raise ValueError(f"gate rule {part!r}: expected METRIC<VALUE or METRIC>=VALUE, e.g. error_rate<0.01, "
                             "p99_ms<50 or accuracy>=0.9")
        metric, op, limit = m.groups()
        if metric not in GATE_METRICS:
            raise ValueError(f"gate rule {part!r}: unknown metric {metric!r} ({', '.join(GATE_METRICS)})")
        if (problem := _direction_problem(metric, op)) is not None:
            raise ValueError(f"gate rule {part!r}: {problem}")
        try:
            rules.append(GateRule(metric=metric, op=op, limit=float(limit)))
        except ValueError:
            raise ValueError(f"gate rule {part!r}: {limit!r} is not a number") from None
    return rules


class Health(BaseModel):
    """What a device measured of its active version since it was activated."""

    events: int = Field(default=0, ge=0, le=MAX_COUNTER)
    errors: int = Field(default=0, ge=0, le=MAX_COUNTER)
    p99_ms: float | None = Field(default=None, ge=0, le=MAX_MS, allow_inf_nan=False)
    # The share of the release's labelled health samples its functions answered right here, through the
    # delegates this device chose (None: no labelled sample ran).
    accuracy: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _errors_are_events(self) -> Health:
        if self.errors > self.events:
            raise ValueError(f"errors ({self.errors}) cannot outnumber events ({self.events})")
        return self

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.events if self.events else None


MAX_USAGE = 1e15  # bytes, calls and seconds a device may claim for one function (far past any real total)
MAX_FUNCTIONS = 64  # functions whose usage one report carries (a report stays a few kB)


class FunctionUsage(BaseModel):
    """What one function has cost a device since its daemon started (edgefn.observe.usage): its "bill"."""

    invocations: int = Field(default=0, ge=0, le=MAX_USAGE)
    guest_cpu_s: float = Field(default=0.0, ge=0, le=MAX_USAGE, allow_inf_nan=False)
    peak_memory_bytes: int = Field(default=0, ge=0, le=MAX_USAGE)
    infer_local_calls: int = Field(default=0, ge=0, le=MAX_USAGE)
    infer_local_s: float = Field(default=0.0, ge=0, le=MAX_USAGE, allow_inf_nan=False)
    infer_cloud_calls: int = Field(default=0, ge=0, le=MAX_USAGE)
    infer_cloud_s: float = Field(default=0.0, ge=0, le=MAX_USAGE, allow_inf_nan=False)
    bytes_in: int = Field(default=0, ge=0, le=MAX_USAGE)
    bytes_out: int = Field(default=0, ge=0, le=MAX_USAGE)


Usage = Annotated[dict[Name, FunctionUsage], Field(max_length=MAX_FUNCTIONS)]


class DeviceReport(BaseModel):
    """POST by the agent at start, at every update step and every poll; registers the device."""

    group: Name
    state: DeviceState
    bundle: Name | None = None  # what is active on the device (None: nothing from the fleet yet)
    version: Name | None = None
    rollout: int | None = Field(default=None, ge=1, le=MAX_ID)  # the rollout the state refers to
    target_version: Name | None = None  # the version being installed or refused
    detail: str = Field(default="", max_length=2000)  # why it failed or rolled back, in words
    health: Health = Field(default_factory=Health)
    agent: str = Field(default="", max_length=128)
    usage: Usage = Field(default_factory=dict)  # function -> its usage since the daemon started


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
    counter_resets: int = 0  # times its counters went down within a rollout (a restart, or a liar)
    last_seen: float  # unix seconds
    usage: dict[str, FunctionUsage] = Field(default_factory=dict)  # as last reported


class BundleRecord(BaseModel):
    name: str
    version: str
    target: str
    sha256: str
    size: int
    published: float


class EnrollRequest(BaseModel):
    """The operator enrolls a device in a group; the answer carries its credential, once."""

    device_id: Name
    group: Name


class Enrollment(BaseModel):
    device_id: str
    group: str
    token: str  # the device's bearer token: give it to the device (--device-token-file, EDGEFN_DEVICE_TOKEN)


class RolloutRequest(BaseModel):
    bundle: Name
    version: Name
    group: Name
    canary: int = Field(default=1, ge=0, le=100_000)
    # The canary devices by name (the operator's choice), else the first `canary` of the group by id.
    canary_devices: list[Name] = Field(default_factory=list, max_length=1000)
    waves: list[float] = Field(default_factory=lambda: [100.0], max_length=100)  # cumulative % of the group
    gate: list[GateRule] = Field(default_factory=list, max_length=16)
    soak_s: float = Field(default=30.0, ge=0, le=30 * 86400)
    wave_timeout_s: float = Field(default=600.0, gt=0, le=30 * 86400)  # a wave not healthy by then halts it

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


class AuditEntry(BaseModel):
    """One operator action on the fleet server, as asked and answered (cloud_sync.fleet.audit)."""

    id: int
    at: float  # unix seconds
    who: str  # "operator", "anonymous" (no operator token on the server), "unauthenticated", "unknown <sha256>"
    action: str  # publish, rollout.create|pause|resume|abort, device.enroll|revoke|remove
    arguments: dict[str, Any] = Field(default_factory=dict)  # secrets redacted
    status: int  # the HTTP status answered: 2xx done, 4xx refused
    result: str  # what was done, or why it was refused
