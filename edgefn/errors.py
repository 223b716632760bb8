"""edgefn's own exceptions; lower-layer errors (paho, wasmtime, onnxruntime) are mapped to these
at the module that talks to that layer.

    EdgefnError
    ├── ConfigError          bad flags, config file or environment
    ├── ManifestError        an edgefn.toml that does not validate
    ├── BuildError           componentize-py could not build a function
    ├── ModelError           a model that cannot be found, loaded or run
    ├── BrokerError          the MQTT broker refused or dropped the connection
    └── FunctionError        an event the function could not handle (goes to edgefn/errors/<fn>)
        ├── GuestError       the guest answered with an error (bad payload, ...)
        ├── GuestTrap        the guest trapped (a bug, a stack overflow)
        ├── GuestTimeout     the guest ran past its per-event deadline
        ├── GuestOutOfMemory the guest exceeded its memory limit
        ├── OutputRejected   the guest asked to publish what its manifest does not allow
        └── PayloadTooLarge  the event is larger than max_payload_bytes (never reaches the guest)
"""

from __future__ import annotations


class EdgefnError(Exception):
    """Base of every error edgefn raises on purpose."""


class ConfigError(EdgefnError):
    pass


class ManifestError(EdgefnError):
    pass


class BuildError(EdgefnError):
    pass


class ModelError(EdgefnError):
    pass


class BrokerError(EdgefnError):
    pass


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
