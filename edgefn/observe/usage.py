"""Usage metering: what each function costs the device, for `/metrics`, `edgefn status` and the fleet report.

Per function: invocations (events handed to the guest), guest CPU seconds, peak instance memory, `host.infer`
calls and seconds (here and on the cloud endpoint), and bytes in (payloads) and out (outputs).

Guest CPU is the worker thread's CPU time (`time.thread_time`) around the guest call, less the CPU the
thread spent inside `host.infer` (inference is metered on its own): the guest's code and the boundary's
conversions, which is what a function's own code costs. Not wasmtime fuel: fuel needs `consume_fuel` in
the engine (slower code for every function, and another compiled-component cache), and it counts
instructions, not seconds, so it says nothing of the boundary's Python work, the larger part of a call.

Cheap by design: two clock reads and one lock per batch, two clock reads per infer call; memory is read
from the process's map only when someone asks (a scrape, a status, a report).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgefn.events import Event

WHERE = ("local", "cloud")


@dataclass
class FunctionUsage:
    """One function's totals since the daemon started."""

    invocations: int = 0
    guest_cpu_s: float = 0.0
    peak_memory_bytes: int = 0
    infer_calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WHERE, 0))
    infer_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WHERE, 0.0))
    bytes_in: int = 0
    bytes_out: int = 0

    def summary(self) -> dict[str, float | int]:
        """The flat form `edgefn status` and the fleet report carry (protocol.fleet.FunctionUsage)."""
        return {"invocations": self.invocations, "guest_cpu_s": round(self.guest_cpu_s, 6),
                "peak_memory_bytes": self.peak_memory_bytes,
                "infer_local_calls": self.infer_calls["local"], "infer_local_s": round(self.infer_s["local"], 6),
                "infer_cloud_calls": self.infer_calls["cloud"], "infer_cloud_s": round(self.infer_s["cloud"], 6),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


class GuestCall:
    """The clocks of one guest call (a batch), started by `Usage.call`; `done(answers)` books it."""

    __slots__ = ("_usage", "_function", "_events", "_cpu", "_inferring")

    def __init__(self, usage: Usage, function: str, events: Sequence[Event]):
        self._usage, self._function, self._events = usage, function, events
        self._inferring = getattr(usage._thread, "cpu", 0.0)
        self._cpu = time.thread_time()

    def done(self, answers: Sequence[object]) -> None:
        """Book the call: `answers` are handle_batch's (a list of messages, or the event's error)."""
        cpu = time.thread_time() - self._cpu
        usage = self._usage
        cpu -= getattr(usage._thread, "cpu", 0.0) - self._inferring
        bytes_in = bytes_out = 0
        for event in self._events:
            bytes_in += len(event.payload)
        for answer in answers:
            if type(answer) is list:
                for message in answer:
                    bytes_out += len(message.payload)
        with usage._lock:
            booked = usage._functions.get(self._function) or usage._of(self._function)
            booked.invocations += len(self._events)
            booked.guest_cpu_s += cpu if cpu > 0.0 else 0.0
            booked.bytes_in += bytes_in
            booked.bytes_out += bytes_out


class _Off:
    """A guest call when metering is off: nothing measured."""

    def done(self, answers: Sequence[object]) -> None:
        pass


_OFF = _Off()
UNMETERED = _OFF  # a guest call not to book (a health check's sample, one a worker process meters)


class Usage:
    """Every function's usage; a Prometheus collector of it too. `enabled=False` meters nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._lock = threading.Lock()
        self._functions: dict[str, FunctionUsage] = {}
        self._thread = threading.local()  # the CPU this thread spent in host.infer: not the guest's
        # function -> its largest live instance's linear memory; set by the daemon (its functions change)
        self.memory: Callable[[], dict[str, int]] = dict

    def call(self, function: str, events: Sequence[Event]) -> GuestCall | _Off:
        """Start metering one guest call of `events`; `.done(answers)` when it returns."""
        return GuestCall(self, function, events) if self.enabled else _OFF

    def inferred(self, function: str, where: str, seconds: float, cpu_s: float) -> None:
        """One `host.infer` call of `function` that ran `where` (local, cloud), `seconds` of wall time and
        `cpu_s` of this thread's CPU."""
        if not self.enabled:
            return
        self._thread.cpu = getattr(self._thread, "cpu", 0.0) + cpu_s
        with self._lock:
            usage = self._of(function)
            usage.infer_calls[where] += 1
            usage.infer_s[where] += seconds

    def _of(self, function: str) -> FunctionUsage:
        usage = self._functions.get(function)
        if usage is None:
            usage = self._functions[function] = FunctionUsage()
        return usage

    def take(self, function: str) -> FunctionUsage | None:
        """What `function` has cost since the last take, reset (a worker process hands it to the daemon's)."""
        with self._lock:
            return self._functions.pop(function, None)

    def add(self, function: str, more: FunctionUsage | None) -> None:
        """Book what a worker process measured of `function` (its `take`)."""
        if more is None or not self.enabled:
            return
        with self._lock:
            usage = self._of(function)
            usage.invocations += more.invocations
            usage.guest_cpu_s += more.guest_cpu_s
            usage.peak_memory_bytes = max(usage.peak_memory_bytes, more.peak_memory_bytes)
            for where in WHERE:
                usage.infer_calls[where] += more.infer_calls[where]
                usage.infer_s[where] += more.infer_s[where]
            usage.bytes_in += more.bytes_in
            usage.bytes_out += more.bytes_out

    def snapshot(self) -> dict[str, FunctionUsage]:
        """Each function's totals now (copies), with its peak memory read afresh."""
        sizes = self.memory() if self.enabled else {}
        with self._lock:
            for function, size in sizes.items():
                usage = self._of(function)
                usage.peak_memory_bytes = max(usage.peak_memory_bytes, size)
            return {name: FunctionUsage(u.invocations, u.guest_cpu_s, u.peak_memory_bytes, dict(u.infer_calls),
                                        dict(u.infer_s), u.bytes_in, u.bytes_out)
                    for name, u in sorted(self._functions.items())}

    def summary(self) -> dict[str, dict[str, float | int]]:
        """function -> its flat totals (`edgefn status`, the fleet report)."""
        return {name: usage.summary() for name, usage in self.snapshot().items()}

    def collect(self) -> Iterator[Metric]:
        """The Prometheus families (this object is registered as a collector)."""
        functions = self.snapshot()
        invocations = CounterMetricFamily("edgefn_function_invocations", "Events handed to a function's guest.",
                                          labels=["function"])
        cpu = CounterMetricFamily("edgefn_function_guest_cpu_seconds", "CPU time of the worker thread in the "
                                  "guest call (guest code and the boundary), host.infer excluded.",
                                  labels=["function"])
        memory = GaugeMetricFamily("edgefn_function_peak_memory_bytes", "Largest linear memory of one of the "
                                   "function's instances (sampled when read).", labels=["function"])
        calls = CounterMetricFamily("edgefn_function_infer_calls", "host.infer calls, by where they ran.",
                                    labels=["function", "where"])
        seconds = CounterMetricFamily("edgefn_function_infer_seconds", "Wall time of host.infer calls, by where "
                                      "they ran.", labels=["function", "where"])
        nbytes = CounterMetricFamily("edgefn_function_bytes", "Payload bytes into the function (in) and output "
                                     "bytes out of it (out).", labels=["function", "direction"])
        for name, u in functions.items():
            invocations.add_metric([name], u.invocations)
            cpu.add_metric([name], u.guest_cpu_s)
            memory.add_metric([name], u.peak_memory_bytes)
            for where in WHERE:
                calls.add_metric([name, where], u.infer_calls[where])
                seconds.add_metric([name, where], u.infer_s[where])
            nbytes.add_metric([name, "in"], u.bytes_in)
            nbytes.add_metric([name, "out"], u.bytes_out)
        yield from (invocations, cpu, memory, calls, seconds, nbytes)
