"""edgefn's own exceptions; lower-layer errors (paho, wasmtime, onnxruntime) are mapped to these
at the module that talks to that layer.

    EdgefnError
    ├── ConfigError          bad flags, config file or environment
    ├── ManifestError        an edgefn.toml that does not validate
    ├── ProfileError         a device profile that does not validate, or none by that name
    ├── BuildError           componentize-py could not build a function
    ├── ModelError           a model that cannot be found, loaded or run
    ├── BrokerError          the MQTT broker refused or dropped the connection
    ├── CloudError           the cloud inference endpoint refused a request or answered nonsense
    │   └── CloudUnavailable the endpoint gave no answer: circuit breaker open, unreachable, timed out, 5xx
    └── FunctionError        an event the function could not handle (goes to edgefn/errors/<fn>)
        ├── GuestError       the guest answered with an error (bad payload, ...)
        ├── GuestTrap        the guest trapped (a bug, a stack overflow)
        ├── GuestTimeout     the guest ran past its per-event deadline
        ├── GuestOutOfMemory the guest exceeded its memory limit
        ├── OutputRejected   the guest asked to publish what its manifest does not allow
        ├── PayloadTooLarge  the event is larger than max_payload_bytes (never reaches the guest)
        └── Quarantined      its payload (or its shape) kept trapping the guest: refused for a while
                             without running (edgefn/functions/quarantine.py)
"""

from __future__ import annotations


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


class CloudError(EdgefnError):
    """The cloud endpoint (OIP v2) refused a request or answered nonsense; `status` is its HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class CloudUnavailable(CloudError):
    """No answer from the cloud endpoint (breaker open, connection failed, timed out, 5xx): run it here instead."""


class FleetError(EdgefnError):
    """The fleet server refused a request or could not be reached (the operator's CLI, the device agent)."""


class BundleError(FleetError):
    """A bundle that cannot be built, unpacked or is malformed (names the file and what is wrong)."""


class UpdateRefused(FleetError):
    """A release the device will not run: a bad signature or hash, stale, rolled-back or mixed TUF
    metadata (python-tuf's reason), or a version older than the one running."""


class FunctionError(EdgefnError):
    """An event a function could not handle; `reason` is a short machine-readable kind."""

    reason = "error"


class GuestError(FunctionError):
    reason = "guest-error"


class GuestTrap(FunctionError):
    reason = "trap"


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
