"""Prometheus metrics of one daemon, and the loopback HTTP server for /metrics and /healthz."""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgefn.observe.usage import Usage

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Pool(Protocol):
    """What the instance gauge reads of a function's sandbox."""

    @property
    def instances(self) -> int: ...


class Metrics:
    """The daemon's instruments, in a registry of its own (several daemons can share a process)."""

    def __init__(self, metering: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.usage = Usage(enabled=metering)  # what each function costs (edgefn.observe.usage)
        r.register(self.usage)
        self.events_received = Counter("edgefn_events_received", "Events journaled from the broker.", registry=r)
        self.events_redelivered = Counter("edgefn_events_redelivered", "Of those, events the broker sent again "
                                          "(DUP set: sent before the last reconnect, perhaps answered).", registry=r)
        self.events_unrouted = Counter("edgefn_events_unrouted", "Events the broker delivered that no function "
                                       "takes: answered on edgefn/errors/unrouted (its payload says the topic "
                                       "and why).", registry=r)
        self.events_handled = Counter("edgefn_events_handled", "Events handled, by function and outcome.",
                                      ["function", "outcome"], registry=r)
        self.event_seconds = Histogram("edgefn_event_seconds", "Receive to outputs handed to the broker.",
                                       ["function"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_events = Histogram("edgefn_batch_events", "Events handed to a function in one call.",
                                      ["function"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.messages_published = Counter("edgefn_messages_published", "Messages acknowledged by the broker.",
                                          registry=r)
        self.messages_refused = Counter("edgefn_messages_refused", "Messages the broker refused (PUBACK failure).",
                                        registry=r)
        self.broker_refusals = Counter("edgefn_broker_refusals", "PUBACKs and SUBACKs with a failure reason code "
                                       "(an ACL: not authorized, ...), by kind (publish, subscribe), filter (a publish: "
                                       "its function's publish filter, else its topic's first level) and reason.",
                                       ["kind", "filter", "reason"], registry=r)
        self.inbox_depth = Gauge("edgefn_inbox_events", "Events in the inbox, not yet answered.", registry=r)
        self.outbox_depth = Gauge("edgefn_outbox_messages", "Answers in the outbox, not yet acknowledged by the broker.",
                                  registry=r)
        self.profile = Gauge("edgefn_device_profile_info", "1 for the device profile in use.", ["profile"], registry=r)
        self.temperature = Gauge("edgefn_device_temperature_celsius", "Thermal zones, by their type.", ["zone"],
                                 registry=r)
        self.memory_available = Gauge("edgefn_device_memory_available_bytes", "MemAvailable.", registry=r)
        self.pressure = Gauge("edgefn_device_pressure", "1 for the current state of each kind of pressure, against "
                              "the profile's limits.", ["kind", "state"], registry=r)
        self.offload = Counter("edgefn_offload", "Inference calls sent to the cloud endpoint, by outcome: handed-off "
                               "(overload or always), asked-again (low confidence), ran-here-instead (it failed, "
                               "and `reason` says how: breaker-open, unreachable, timeout, server-error, refused, "
                               "not-served, mismatch, bad-answer; empty for the others).",
                               ["function", "outcome", "reason"], registry=r)
        self.breaker = Gauge("edgefn_cloud_breaker", "1 for the state of the cloud endpoint's circuit breaker.",
                             ["state"], registry=r)
        self.broker_connected = Gauge("edgefn_broker_connected", "1 while connected to the broker.", registry=r)
        self.function_load_failed = Gauge("edgefn_function_load_failed", "1 for each function that did not load "
                                          "(its build failed, a model is missing, ...); the others serve.",
                                          ["function"], registry=r)
        self.model_variant = Gauge("edgefn_model_variant_info", "1 for the variant each model runs as, its format and "
                                   "delegate.", ["model", "variant", "format", "delegate"], registry=r)
        self.function_instances = Gauge("edgefn_function_instances", "Sandbox instances a function holds now "
                                        "(idle, busy and being made), between its min_instances and max_instances.",
                                        ["function"], registry=r)
        self.guest_log_dropped_lines = Counter("edgefn_guest_log_dropped_lines", "Lines a function asked to log "
                                               "past its bound (log_lines_per_s, log_bytes_per_s): dropped.",
                                               ["function"], registry=r)
        self.guest_log_dropped_bytes = Counter("edgefn_guest_log_dropped_bytes", "Their bytes (UTF-8, each line "
                                               "cut at 4,096 characters first).", ["function"], registry=r)
        self.inference_batch = Histogram("edgefn_inference_batch_calls", "Infer calls served by one inference run "
                                         "(micro-batching), by model and where it ran; 1: the call ran alone.",
                                         ["model", "where"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)

    def watch_instances(self, function: str, sandbox: _Pool) -> None:
        """`edgefn_function_instances{function}` reads the sandbox's pool when scraped (a release swapped in
        takes the label over; the old sandbox is not kept alive by it)."""
        pool = weakref.ref(sandbox)

        def count() -> float:
            held = pool()
            return float(held.instances) if held is not None else 0.0

        self.function_instances.labels(function).set_function(count)

    def set_model_variant(self, model: str, variant: str, fmt: str, delegate: str) -> None:
        """Record the variant a model was loaded as (the registry's on_load)."""
        self.model_variant.labels(model, variant, fmt, delegate).set(1)

    def observe_inference_batch(self, model: str, where: str, calls: int) -> None:
        """Record how many infer calls one inference run served (the batcher's on_batch)."""
        self.inference_batch.labels(model, where).observe(calls)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ObserveServer:
    """GET /metrics (Prometheus text) and GET /healthz (JSON) on 127.0.0.1 only."""

    def __init__(self, metrics: Metrics, health: Callable[[], dict], port: int):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, metrics.render())
                elif self.path == "/healthz":
                    state = health()
                    self._send(200 if state.get("status") == "ok" else 503, "application/json",
                               json.dumps(state).encode())
                else:
                    self._send(404, "text/plain", b"try /metrics or /healthz\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep the daemon's log for the daemon
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgefn-observe", daemon=True)
        outer._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
