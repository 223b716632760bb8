"""edgefn's own exceptions, for the device and for cloud_sync; lower-layer errors (paho, wasmtime,
onnxruntime, httpx, python-tuf) are mapped to these at the module that talks to that layer.

    EdgefnError
    ├── ConfigError          bad flags, config file or environment
    ├── ManifestError        an edgefn.toml that does not validate
    ├── ProfileError         a device profile that does not validate, or none by that name
    ├── BuildError           componentize-py could not build a function
    ├── ModelError           a model that cannot be found, loaded or run
    ├── BrokerError          the MQTT broker refused or dropped the connection
    ├── CloudError           the cloud inference endpoint refused a request or answered nonsense (status)
    │   └── CloudUnavailable the endpoint gave no answer: circuit breaker open, unreachable, timed out, 5xx
    ├── StorageError         the journal or the function state cannot be written or read
    │   ├── DiskFull         no space left: the write was refused whole, nothing half-written
    │   └── JournalFull      the journal is at its byte budget on disk: new events refused whole
    ├── FleetError           the fleet server refused a request (status) or could not be reached
    │   ├── BundleError      a bundle that cannot be built or unpacked, or is malformed
    │   ├── UpdateRefused    a release the device will not run (signature, hash, stale, rolled back, mixed)
    │   ├── ClockSkew        the device's clock is off: signed metadata looks expired here only
    │   └── PublishRefused   the fleet server will not publish an upload (status 400)
    └── FunctionError        an event the function could not handle (goes to edgefn/errors/<fn>)
        ├── GuestError       the guest answered with an error (bad payload, ...)
        ├── GuestTrap        the guest trapped (a bug, a stack overflow)
        │   └── GuestStackOverflow  its call stack ran out (`where`: the guest frames that recursed)
        ├── GuestTimeout     the guest ran past its per-event deadline
        ├── GuestOutOfMemory the guest exceeded its memory limit
        ├── OutputRejected   the guest asked to publish what its manifest does not allow
        ├── PayloadTooLarge  the event is larger than max_payload_bytes (never reaches the guest)
        ├── Quarantined      its payload (or stack faults as deep) kept trapping the guest: refused for a while
        ├── Loop             the event came through max_hops functions already (edgefn-hop): not run
        ├── Shed             a low-priority event dropped under overload, where its manifest allows it
                             without running (edgefn/functions/quarantine.py)
        ├── WorkerCrashed    the event killed the worker process that ran it, twice (edgefn.dispatch.processes)
        └── NotLoaded        its function loaded in the daemon but not in the worker processes

Errors that stand for an HTTP answer carry its status one way, MLServer style: the `HttpStatus` mixin
gives them `status` (an int, or None where no answer came), marked (status) above. The OIP v2 errors of
`edgefn.protocol.oip` (`OipError`, and its `ProtocolError` for a 400) carry theirs the same way.

`validation_text` turns a pydantic (or FastAPI) validation error into the one line every caller shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class HttpStatus:
    """Mixin of the errors that stand for an HTTP answer: `status` is its status code, None where no answer
    came (unreachable, timed out) or none applies. A class may set `default_status`."""

    default_status: int | None = None

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)  # type: ignore[call-arg]  # next in the MRO: the exception class
        self.status: int | None = self.default_status if status is None else status


class EdgefnError(Exception):
    """Base of every error edgefn raises on purpose."""


class ConfigError(EdgefnError):
    pass


class ManifestError(EdgefnError):
    pass


class ProfileError(EdgefnError):
    pass


class BuildError(EdgefnError):
    pass


class ModelError(EdgefnError):
    pass


class BrokerError(EdgefnError):
    pass


class CloudError(HttpStatus, EdgefnError):
    """The cloud endpoint (OIP v2) refused a request or answered nonsense; `status` is its HTTP status, if any.

    `reason` names the kind of failure in a word, for the offload metric and the log: refused (a 4xx),
    not-served (the endpoint has no such model), mismatch (its names, datatypes or shapes are not the
    local model's), bad-answer (not an OIP answer, or one that does not fit the model), not-oip (GET /v2
    does not answer as an OIP server does: no such endpoint at that URL); and for
    `CloudUnavailable`: breaker-open, unreachable, timeout, server-error (5xx)."""

    default_reason = "refused"

    def __init__(self, message: str, status: int | None = None, reason: str | None = None):
        super().__init__(message, status)
        self.reason: str = reason or self.default_reason


class CloudUnavailable(CloudError):
    """No answer from the cloud endpoint (breaker open, connection failed, timed out, 5xx): run it here instead."""

    default_reason = "unreachable"


class StorageError(EdgefnError):
    """A state file (the journal, function state) that cannot be written or read; one line, naming the file."""


class DiskFull(StorageError):
    """No space left for a write; the transaction was rolled back whole. Resumes once space returns."""


class JournalFull(StorageError):
    """The journal holds its byte budget on disk (journal_max_bytes): new events refused whole, nothing
    written. Resumes as answered events leave it."""


class FleetError(HttpStatus, EdgefnError):
    """The fleet server refused a request or could not be reached (the operator's CLI, the device agent); on
    the server, a request it refuses. `status` is the HTTP status of the refusal, if any."""


class BundleError(FleetError):
    """A bundle that cannot be built, unpacked or is malformed (names the file and what is wrong)."""


class UpdateRefused(FleetError):
    """A release the device will not run: a bad signature or hash, stale, rolled-back or mixed TUF
    metadata (python-tuf's reason), or a version older than the one running."""


class ClockSkew(FleetError):
    """The fleet's signed metadata looks expired to this device, and its clock disagrees with the fleet
    server's: the device's own problem, not the release's. Tried again once the clock is sane."""


class PublishRefused(FleetError):
    """An upload the fleet server will not publish (not TUF metadata, not signed by the trusted root, older
    than what it has, a bundle its signed targets do not name): a 400."""

    default_status = 400


class FunctionError(EdgefnError):
    """An event a function could not handle; `reason` is a short machine-readable kind."""

    reason = "error"


class GuestError(FunctionError):
    reason = "guest-error"


class GuestTrap(FunctionError):
    reason = "trap"


class GuestStackOverflow(GuestTrap):
    """The guest's call stack ran out; `where` names the guest functions that recursed ("" if unknown), so
    that the quarantine can learn this fault apart from others (edgefn/functions/quarantine.py)."""

    def __init__(self, message: str = "stack overflow", *, where: str = ""):
        super().__init__(message)
        self.where = where


class GuestTimeout(FunctionError):
    reason = "timeout"


class GuestOutOfMemory(FunctionError):
    reason = "out-of-memory"


class OutputRejected(FunctionError):
    reason = "output-rejected"


class PayloadTooLarge(FunctionError):
    reason = "payload-too-large"


class Quarantined(FunctionError):
    reason = "quarantined"


class Loop(FunctionError):
    reason = "loop"


class Shed(FunctionError):
    reason = "shed"


class WorkerCrashed(FunctionError):
    reason = "worker-crashed"


class NotLoaded(FunctionError):
    reason = "load-failed"


class _Invalid(Protocol):
    """What `validation_text` reads: pydantic's ValidationError, FastAPI's RequestValidationError."""

    def errors(self) -> Sequence[Mapping[str, Any]]: ...


def validation_text(exc: _Invalid, messages: Mapping[str, str] | None = None) -> str:
    """A validation error's problems in one line, `field.path: message; ...` ("(top level)" where the path is
    empty). `messages` replaces pydantic's message for an error type; it is formatted with the error's
    context, e.g. {"value_error": "{error}"} drops pydantic's "Value error, " prefix."""
    messages = messages or {}

    def message(error: Mapping[str, Any]) -> str:
        override = messages.get(error["type"])
        return error["msg"] if override is None else override.format(**error.get("ctx", {}))

    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {message(e)}" for e in exc.errors())
