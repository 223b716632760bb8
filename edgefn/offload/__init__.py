"""Hand-off of inference to a cloud endpoint speaking the Open Inference Protocol v2: the client, its
circuit breaker and the planner that decides what goes there. The wire format, shared with `cloud_sync.serve`,
is `edgefn.protocol.oip`."""

from edgefn.offload.breaker import BreakerState, BreakerStats, CircuitBreaker, Permit
from edgefn.offload.client import CloudClient

__all__ = ["BreakerState", "BreakerStats", "CircuitBreaker", "CloudClient", "Permit"]
