"""Hand-off of inference to a cloud endpoint speaking the Open Inference Protocol v2: the client, its
circuit breaker and the planner that decides what goes there. The wire format, shared with `cloud_sync.serve`,
is `edgefn.protocol.oip`.

Nothing is imported here: the planner is on every event's path, the client (httpx) only where an
endpoint is configured."""
