"""Settings of `edgefn run`: flags over environment (EDGEFN_*) over a TOML config file over
defaults, merged here rather than by pydantic-settings (which, with what it imports, held 3 MB of the
daemon's memory for these few lines). Secrets (the broker password, the device's fleet token) come
from the environment or a file and are never logged; a password written into a URL
(`mqtt://user:pass@host`) is used, and every URL is printed through `redact_url`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from edgefn.errors import ConfigError, validation_text
from edgefn.protocol.offload import Policy
from edgefn.tomlfile import read_toml


def redact_url(url: str) -> str:
    """The URL as it may be printed: a password in it replaced by ***, the user name kept."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that does not parse>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}{':***' if parts.password is not None else ''}@{host}"))


def check_url(url: str, schemes: tuple[str, ...], shape: str) -> str:
    """`url` if it is one of `schemes` with a host, and a port from 1 to 65535 where it names one; else a
    one-line ValueError that says why, and what it must look like (`shape`). urlsplit parses the port only
    when asked for it: `mqtt://HOST:abc` used to pass here and end the daemon in a traceback on connecting."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # Invalid IPv6 URL
        raise ValueError(f"{exc}: must look like {shape}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must look like {shape}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # 0: no port a server listens on (and `port or default` would quietly take the default)
        given = parts.netloc.rpartition("@")[2].rpartition(":")[2]  # past a user and password: never said
        raise ValueError(f"port {given!r} is not a number from 1 to 65535: must look like {shape}")
    return url


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without a user and password, the user, the password), both unquoted; None where absent."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), user, password


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "edgefn"


ENV_PREFIX = "EDGEFN_"
HTTP_SCHEMES, HTTP_SHAPE = ("http", "https"), "http://HOST:PORT or https://HOST:PORT"


class Settings(BaseModel):
    """Everything `edgefn run` needs; each field is also EDGEFN_<FIELD> in the environment (`load_settings`)."""

    model_config = ConfigDict(extra="forbid")

    broker: str = Field(default="mqtt://127.0.0.1:1883", description="mqtt://HOST:PORT or mqtts://HOST:PORT (TLS).")
    username: str | None = Field(default=None, description="Broker user name.")
    password: SecretStr | None = Field(default=None, description="Broker password (prefer EDGEFN_PASSWORD).")
    ca_file: Path | None = Field(default=None, description="CA certificate that signed the broker's; enables TLS.")
    cert_file: Path | None = Field(default=None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(default=None, description="Client private key (PEM) for mutual TLS.")
    client_id: str = Field(default_factory=lambda: f"edgefn-{socket.gethostname()}",
                           description="MQTT client id; the broker keeps this session across restarts.")
    functions: list[Path] = Field(default_factory=lambda: [Path("functions")],
                                  description="Function folders, or folders of function folders.")
    models: list[Path] = Field(default_factory=lambda: [Path("models")], description="Folders of models.")
    model_variants: dict[str, str] = Field(default_factory=dict, description="Model name -> the variant of its "
                                           "model.json to run (default: the best one that runs here).")
    cloud_url: str | None = Field(default=None, description="The cloud inference endpoint (Open Inference Protocol "
                                  "v2, http:// or https://).")
    cloud_model_map: dict[str, str] = Field(default_factory=dict, description="Model name here -> its name there, "
                                            "then TENSOR=NAME for its inputs or outputs named otherwise there "
                                            "(\"digits-sk,label=predict\").")
    cloud_auth_header: str | None = Field(default=None, description="Header that carries the endpoint's credential.")
    cloud_auth_env: str | None = Field(default=None, description="Environment variable holding that credential.")
    cloud_timeout_s: float = Field(default=2.0, gt=0, description="Per cloud call: connect, send, answer.")
    cloud_retries: int = Field(default=2, ge=0, description="Retries of a cloud call on a connection error or 5xx.")
    cloud_cooldown_s: float = Field(default=5.0, ge=0, description="After the endpoint failed: seconds before "
                                    "one trial call may close the circuit breaker again.")
    cloud_workers: int = Field(default=4, ge=0, le=64, description="Extra instances per function that run the "
                               "batches handed to the cloud (on-overload, always).")
    workers: int | None = Field(default=None, ge=0, le=64, description="Worker processes that run the functions "
                                "(sandboxes and models), each on a core of its own, apart from intake (reading, "
                                "journaling, acknowledging, publishing) (default: the cores less one, at least one; "
                                "0: run them in the daemon's own process, on threads). A function with a cloud "
                                "endpoint runs in the daemon's process.")
    batch_max: int = Field(default=16, ge=1, le=1024, description="Most concurrent infer calls of one model "
                           "stacked into one inference, here or on the cloud endpoint (1: no micro-batching).")
    batch_wait_ms: float = Field(default=2.0, ge=0, le=1000, description="Longest a call waits for others to "
                                 "stack with; only while other calls of that model are in flight.")
    offload: Policy | None = Field(
        default=None, description="Overrides every function's offload policy.")
    profile: str | None = Field(default=None, description="Device profile by name (default: detected from the device).")
    device_root: Path = Field(default=Path("/"), description="Where the device's /proc, /sys, /dev and /etc are "
                              "read from, for detection and sensor readings.")
    delegate_dirs: list[Path] = Field(default_factory=list, description="Folders to look for delegate libraries "
                                      "in before the system loader's path.")
    state_dir: Path = Field(default_factory=default_state_dir, description="Journal and compiled-component cache.")
    metrics_port: int | None = Field(default=None, ge=0, le=65535,
                                     description="Serve /metrics and /healthz on 127.0.0.1:PORT (0: any free port).")
    max_payload_bytes: int = Field(default=256 * 1024, ge=1, description="Larger events go to the error topic, unseen by the function.")
    max_hops: int = Field(default=8, ge=1, le=1000, description="Functions a chain of events may go through (each "
                          "output carries its count, edgefn-hop): an event that went through this many is not run "
                          "but answered on the error topic with reason loop, so a function that hears its own "
                          "outputs stops.")
    metering: bool = Field(default=True, description="Meter each function's usage (guest CPU, memory, infer calls, "
                           "bytes) for /metrics, `edgefn status` and the fleet report.")
    journal: Literal["disk", "memory"] = Field(
        default="disk", description="disk: events survive a crash; memory: they do not (for measuring the journal's cost).")
    durability: Literal["process", "full"] = Field(
        default="process", description="process: a journal commit survives a crash of the daemon (SIGKILL); full: "
        "also a power loss, at the cost of an fsync per commit.")
    inbox_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1, description="Payload bytes journaled and not yet "
                                 "answered (on disk) before ingress stops acknowledging.")
    inbox_max_events: int = Field(default=50_000, ge=1, description="Events journaled and not yet answered (on "
                                  "disk; about 200 bytes each in memory) before ingress stops acknowledging.")
    journal_max_bytes: int | None = Field(default=None, ge=1, description="The journal's bytes on disk (events, "
                                          "undelivered answers, its WAL) before ingress stops acknowledging; by "
                                          "default half of the filesystem's free space at start (the journal's "
                                          "own files counted as free), so a flood never fills the disk.")
    stall_s: float = Field(default=30.0, gt=0, description="/healthz says stalled when work is pending and nothing "
                           "was published or settled for this long.")
    held_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1, description="Payload bytes received past the inbox's "
                                "bound and held unacknowledged in memory; past it the daemon stops reading from the "
                                "broker, which keeps the rest.")
    function_max_events: int = Field(default=1_000, ge=1, description="Events of one function held in memory; past "
                                     "it they wait in the journal on disk, so a flood backs up only its function.")
    function_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1, description="Payload bytes of one function held "
                                    "in memory; past it they wait in the journal on disk.")
    fleet_url: str | None = Field(default=None, description="Fleet server (edgefn cloud serve --data): the device "
                                  "agent installs, checks and reports the releases it assigns.")
    device_id: str = Field(default_factory=socket.gethostname, description="This device's id in the fleet.")
    group: str = Field(default="default", description="The fleet group this device belongs to.")
    fleet_root: Path | None = Field(default=None, description="The fleet's TUF root metadata (1.root.json), "
                                    "trusted from then on; needed once.")
    device_token: SecretStr | None = Field(default=None, description="This device's fleet credential (from "
                                           "`edgefn fleet devices enroll`; prefer EDGEFN_DEVICE_TOKEN or the file).")
    device_token_file: Path | None = Field(default=None, description="File holding this device's fleet credential.")
    fleet_poll_s: float = Field(default=5.0, gt=0, description="Seconds between asking the fleet server for the "
                                "desired release.")
    config_file: Path | None = Field(default=None, exclude=True, description="TOML file with these settings.")

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return check_url(value, ("mqtt", "mqtts"), "mqtt://HOST:PORT or mqtts://HOST:PORT")

    @field_validator("fleet_url", "cloud_url")
    @classmethod
    def _http_url(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        check_url(value, HTTP_SCHEMES, HTTP_SHAPE)
        if info.field_name == "fleet_url" and "@" in urlsplit(value).netloc:
            raise ValueError("the fleet server takes this device's token (--device-token-file or "
                             "EDGEFN_DEVICE_TOKEN), not a user and password in its URL")
        return value

    @model_validator(mode="after")
    def _broker_login(self) -> Settings:
        """A user name and password written into the broker URL log in; the URL kept holds neither, so it can
        be printed. Given both ways and different, it is refused rather than one silently ignored."""
        broker, user, password = split_credentials(self.broker)
        if broker == self.broker:
            return self
        if user is None and password is not None:
            raise ValueError("broker: a password in the URL needs a user name (mqtt://USER:PASSWORD@HOST)")
        if user is not None and self.username is not None and self.username != user:
            raise ValueError("broker: the URL's user name and --username differ; give one")
        if password is not None and self.password is not None and self.password.get_secret_value() != password:
            raise ValueError("broker: the URL's password and EDGEFN_PASSWORD differ; give one")
        self.username = user or self.username
        if password is not None:
            self.password = SecretStr(password)
        self.broker = broker
        return self

    def fleet_credential(self) -> str | None:
        """The device's fleet token: from device_token_file, else device_token; None when neither is given."""
        if self.device_token_file is not None:
            try:
                token = self.device_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"device_token_file {self.device_token_file}: cannot read it "
                                  f"({exc.strerror or exc})") from None
            if not token:
                raise ConfigError(f"device_token_file {self.device_token_file} is empty")
            return token
        return self.device_token.get_secret_value() if self.device_token is not None else None

    @property
    def fleet_only(self) -> bool:
        """A fleet device without local functions: it runs nothing until the fleet assigns a release."""
        return bool(self.fleet_url) and not any(Path(p).exists() for p in self.functions)

    @property
    def broker_host(self) -> str:
        return urlsplit(self.broker).hostname or "127.0.0.1"

    @property
    def broker_port(self) -> int:
        parts = urlsplit(self.broker)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts" or self.ca_file is not None


def _structured(annotation: Any) -> bool:
    """A list or a map (or either or None): given in the environment as JSON."""
    if get_origin(annotation) in (Union, UnionType):
        return any(_structured(arg) for arg in get_args(annotation))
    return get_origin(annotation) in (list, dict)


def _from_environment() -> dict[str, Any]:
    """EDGEFN_<FIELD> for each field, its name in any case; lists and maps as JSON
    (EDGEFN_MODEL_VARIANTS='{"digits": "tflite-int8"}'). Other EDGEFN_ variables are not settings: ignored."""
    given = {key.upper(): value for key, value in os.environ.items() if key.upper().startswith(ENV_PREFIX)}
    values: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        key = ENV_PREFIX + name.upper()
        if key not in given:
            continue
        if not _structured(field.annotation):
            values[name] = given[key]
            continue
        try:
            values[name] = json.loads(given[key])
        except ValueError as exc:
            raise ConfigError(f"{key}: not JSON ({exc}); a list is written [\"a\", \"b\"], "
                              f"a map {{\"key\": \"value\"}}") from None
    return values


def _from_file(config_file: Path | None) -> dict[str, Any]:
    if config_file is None:
        return {}
    return read_toml(Path(config_file), ConfigError, missing="config file not found")


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Settings from flags (None means 'not given'), environment and an optional TOML file."""
    values = {**_from_file(config_file), **_from_environment(), **{k: v for k, v in flags.items() if v is not None}}
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(validation_text(exc)) from None
