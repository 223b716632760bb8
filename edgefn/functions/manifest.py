"""A function's manifest, `edgefn.toml`: what it is, what triggers it, what it may do.

    [function]
    name = "digits"
    version = "1.0.0"
    module = "app"                      # the Python module that defines WitWorld.handle

    [trigger]
    topics = ["sensors/+/digits", "alarms/#"]  # MQTT filters, subscribed at QoS1 ("$share/GROUP/FILTER":
                                        # shared with the other daemons of GROUP, each event to one of them)
    priority = "normal"                 # high | normal | low: of every filter not named below
    shed = false                        # under overload, low-priority events may be shed (see below)
    ordered = true                      # one batch at a time, in arrival order (default: if it uses state)

    [trigger.priorities]                # per filter (each one of `topics`), overriding `priority`
    "alarms/#" = "high"

    [publish]
    topics = ["results/+/digits"]       # filters its outputs must match
    retain = false                      # whether its messages may ask the broker to retain them
    max_properties = 8                  # user properties per message
    max_property_bytes = 1024           # their keys and values together, UTF-8 bytes per message

    [models]
    use = ["digits"]                    # models it may call through host.infer

    [limits]
    memory_mb = 64                      # linear memory of one instance
    timeout_ms = 500                    # wall-clock deadline per event (epoch interruption)
    min_instances = 0                   # instances kept warm however idle (0: scale to zero; default 1)
    max_instances = 4                   # the most it scales up to (events run concurrently; default 2)
    idle_s = 30                         # an instance idle this long is released, down to min_instances
    # instances = 2                     # the older key: a fixed pool (both bounds)
    max_messages = 16                   # outputs per event
    max_output_bytes = 65536            # total payload bytes per event
    recycle_after = 5000                # events before an instance is replaced by a fresh one
    max_batch = 32                      # queued events handed to handle-batch in one call
    journal_weight = 1                  # its weight in sharing the journal's bound between functions (see below)
    log_lines_per_s = 100               # host.log lines a second (a second's worth at once); the rest dropped, counted
    log_bytes_per_s = 65536             # and their bytes (each line cut at 4,096 characters first)

Priorities. An event's priority for a function is the highest of the function's filters that match
its topic. High-priority events are taken first (from the broker, the journal's bound, the
function's queue, the device's cores); under overload, low-priority ones are handed to the cloud
endpoint first, or, with `shed = true` and no endpoint to take them, answered at once on the error
topic with reason `shed` instead of run. High and normal events are never shed (under overload; past the
function's budget in the journal, below, any may be).

The journal's budget. Every event is journaled before it is acknowledged, and the journal's bound
(`inbox_max_events`, `inbox_max_bytes`) is shared between the functions: each may hold three quarters
of it times its `journal_weight` over the sum of the weights of the functions running, counting its
events journaled and not yet answered. Past that, its new events are answered at once on its error topic
with reason `shed`: low-priority ones from three quarters of its budget, normal ones from the budget, high
ones past a quarter more. So a flood of one function never fills the journal for the others.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgefn.errors import ManifestError, validation_text
from edgefn.events import PRIORITIES, RANK, Priority
from edgefn.observe.guestlog import BYTES_PER_S, LINES_PER_S
from edgefn.protocol.offload import Policy
from edgefn.tomlfile import read_toml
from edgefn.topics import UNROUTED, check_filter, is_shared, matches_any

MANIFEST = "edgefn.toml"
FUNCTION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionSection(_Section):
    name: str = Field(description="Function name: lowercase letters, digits, '-' and '_'.")
    version: str = Field(description="Version of this function, reported with every result.")
    module: str = Field(default="app", description="Python module (file stem) that defines WitWorld.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not FUNCTION_NAME.match(value):
            raise ValueError("must start with a lowercase letter and hold only a-z, 0-9, '-', '_'")
        if value == UNROUTED:  # edgefn/errors/unrouted is the daemon's: events no function takes
            raise ValueError(f"{UNROUTED!r} is reserved (edgefn/errors/{UNROUTED} is where events no function takes go)")
        return value


class TopicsSection(_Section):
    topics: list[str] = Field(default_factory=list, description="MQTT topic filters.")

    @field_validator("topics")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        return [check_filter(t) for t in value]


class TriggerSection(TopicsSection):
    priority: Priority = Field(default="normal", description="high, normal or low: of every trigger filter "
                               "not named in `priorities`.")
    priorities: dict[str, Priority] = Field(default_factory=dict, description="Per trigger filter: its priority.")
    shed: bool = Field(default=False, description="Under overload, low-priority events may be answered on the "
                       "error topic with reason shed instead of run (where no cloud endpoint takes them).")
    ordered: bool | None = Field(default=None, description="Run its events one batch at a time, in arrival order "
                                 "(each function's answers leave in arrival order either way); off: its batches "
                                 "run on every worker at once. Default: on for a function whose sources use "
                                 "host.state_set (read-modify-write needs one writer at a time), else off.")

    @field_validator("priorities")
    @classmethod
    def _named(cls, value: dict[str, Priority]) -> dict[str, Priority]:
        return {check_filter(f): p for f, p in value.items()}

    def keeps_order(self, sources: Path) -> bool:
        """`ordered`, or by default whether the function's Python sources under `sources` set state."""
        if self.ordered is not None:
            return self.ordered
        return any("state_set" in f.read_text(errors="replace") for f in sorted(sources.rglob("*.py")))

    def priority_of_filter(self, topic_filter: str) -> Priority:
        return self.priorities.get(topic_filter, self.priority)

    def priority_of(self, topic: str) -> Priority:
        """The event's priority for this function: the highest of its filters that match `topic`."""
        matching = [self.priority_of_filter(f) for f in self.topics if matches_any(topic, (f,))]
        return min(matching, key=RANK.__getitem__, default=self.priority)

    def filters_by_priority(self) -> dict[Priority, list[str]]:
        """Its filters, by the priority each is declared with (only the priorities it uses)."""
        out: dict[Priority, list[str]] = {}
        for f in self.topics:
            out.setdefault(self.priority_of_filter(f), []).append(f)
        return {p: out[p] for p in PRIORITIES if p in out}


class PublishSection(TopicsSection):
    retain: bool = Field(default=False, description="Whether messages may be retained by the broker.")
    max_properties: int = Field(default=8, ge=0, le=256, description="User properties per message.")
    max_property_bytes: int = Field(default=1024, ge=0, le=65_535,
                                    description="User properties' keys and values, UTF-8 bytes per message.")

    @field_validator("topics")
    @classmethod
    def _not_shared(cls, value: list[str]) -> list[str]:
        for t in value:
            if is_shared(t):
                raise ValueError(f"{t!r} is a shared subscription ($share/...): that is for trigger topics, "
                                 "a message is published to a plain topic")
        return value


class ModelsSection(_Section):
    use: list[str] = Field(default_factory=list, description="Models the function may call.")


class LimitsSection(_Section):
    memory_mb: int = Field(default=64, ge=8, le=4096, description="Linear memory of one instance, MiB.")
    timeout_ms: int = Field(default=500, ge=1, le=600_000, description="Wall-clock deadline per event.")
    instances: int | None = Field(default=None, ge=1, le=64, description="A fixed pool: both min_instances and "
                                  "max_instances (the older key).")
    min_instances: int | None = Field(default=None, ge=0, le=64, description="Instances kept warm however idle "
                                      "(0: scale to zero; default 1, or max_instances if below).")
    max_instances: int | None = Field(default=None, ge=1, le=64, description="The most instances it scales up to "
                                      "(events run concurrently; default 2, or min_instances if above).")
    idle_s: float = Field(default=30.0, gt=0, le=86_400, description="An instance idle this long is released, "
                          "down to min_instances.")
    max_messages: int = Field(default=16, ge=0, le=10_000, description="Output messages per event.")
    max_output_bytes: int = Field(default=65_536, ge=0, description="Output payload bytes per event.")
    recycle_after: int = Field(default=5_000, ge=1, description="Events before an instance is renewed.")
    max_batch: int = Field(default=32, ge=1, le=1024, description="Queued events handed over in one call (1: never batch).")
    journal_weight: float = Field(default=1.0, gt=0, le=1000, description="Its weight in sharing the journal's bound "
                                  "(inbox_max_events, inbox_max_bytes) between functions; past its part, its new "
                                  "events are answered at once with reason shed.")
    # A cut line (4,096 characters, up to 16 KiB in UTF-8) must fit a full second's bytes, or it never passes.
    log_lines_per_s: int = Field(default=LINES_PER_S, ge=1, le=100_000, description="host.log lines a second, with "
                                 "a burst of a second's worth; past it lines are dropped and counted.")
    log_bytes_per_s: int = Field(default=BYTES_PER_S, ge=16_384, le=64 * 1024 * 1024, description="host.log bytes "
                                 "(UTF-8) a second, with a burst of a second's worth; past it lines are dropped "
                                 "and counted.")

    @model_validator(mode="after")
    def _bounds(self) -> LimitsSection:
        if self.instances is not None and (self.min_instances is not None or self.max_instances is not None):
            raise ValueError("instances sets both bounds: give it alone, or min_instances and max_instances")
        least, most = self.instance_bounds
        if least > most:
            raise ValueError(f"min_instances ({least}) is above max_instances ({most})")
        return self

    @property
    def instance_bounds(self) -> tuple[int, int]:
        """(min_instances, max_instances), from whichever keys the manifest gives."""
        if self.instances is not None:
            return self.instances, self.instances
        # One instance kept while idle, a second made when events wait (a board's memory is small: an
        # idle second instance held ~7 MB), released again after idle_s.
        most = self.max_instances if self.max_instances is not None else max(self.min_instances or 0, 2)
        least = self.min_instances if self.min_instances is not None else min(1, most)
        return least, most


class Manifest(_Section):
    function: FunctionSection
    trigger: TriggerSection
    publish: PublishSection = Field(default_factory=PublishSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    latency_budget_ms: float = Field(default=100.0, gt=0, description="Target latency of one event.")
    offload: Policy | None = Field(
        default=None, description="When inference may be handed to the cloud endpoint (default: on-overload "
        "where an endpoint is configured, else never).")
    confidence_threshold: float = Field(default=0.5, ge=0, le=1, description="on-low-confidence: a top score "
                                        "below this asks the cloud's model.")

    @property
    def name(self) -> str:
        return self.function.name

    @property
    def version(self) -> str:
        return self.function.version

    @field_validator("trigger")
    @classmethod
    def _has_trigger(cls, value: TriggerSection) -> TriggerSection:
        if not value.topics:
            raise ValueError("at least one trigger topic is needed")
        unknown = sorted(set(value.priorities) - set(value.topics))
        if unknown:
            raise ValueError(f"priorities name filters that are not trigger topics: {', '.join(unknown)}")
        return value


def load_manifest(function_dir: Path) -> Manifest:
    """Read and validate `<function_dir>/edgefn.toml`; errors name the file and the field."""
    path = Path(function_dir) / MANIFEST
    data = read_toml(path, ManifestError, missing=f"no manifest (a function folder needs an {MANIFEST})")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{path}: {validation_text(exc)}") from None
