"""`edgefn` with a stage clock: the daemon as `python -m edgefn.cli` runs it, with the methods that one event
passes through wrapped to note when each began and ended (perf_counter: CLOCK_MONOTONIC, the same clock
in every process of the machine, so the benchmark can set the spans beside its own publish and arrival).

    python bench/stage_clock.py OUT.json run --broker ... (the arguments of `edgefn`)

At exit it writes OUT.json: {"spans": [[stage, thread, start, end], ...], "threads": {native id: name}}.
Each wrapper costs about a microsecond; it is for bench/stages.py, never for a measurement of speed.
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import threading
import time
from typing import Any

# (module, class, method): the path of one event, in the order it takes them (docs/architecture.md).
STAGES = (
    ("paho.mqtt.client", "Client", "_packet_read"),  # a packet read from the socket, handled (events or results)
    ("edgefn.mqtt.ingress", "Ingress", "on_message"),  # the event taken: journaled, acknowledged, handed over
    ("edgefn.journal.inbox", "Inbox", "append_many"),  # the group commit
    ("paho.mqtt.client", "Client", "_send_puback"),
    ("edgefn.dispatch.lanes", "Lane", "put"),  # into its function's queue
    ("edgefn.dispatch.worker", "Workers", "process"),  # a worker took it: the guest call and the answer
    ("edgefn.functions.sandbox", "FunctionSandbox", "handle_batch"),  # the sandboxed call
    ("edgefn.functions.host", "FunctionHost", "infer"),  # host.infer: the model
    ("edgefn.journal.outbox", "Outbox", "answer"),  # the answer on its way out
    ("edgefn.mqtt.egress", "Egress", "publish"),
    ("paho.mqtt.client", "Client", "_packet_write"),  # bytes written to a socket by paho's thread
    ("edgefn.mqtt.client", "PausableClient", "_write_inline"),  # or by the thread that published them
)

_spans: list[tuple[str, str, float, float]] = []


def _wrap(cls: Any, name: str) -> None:
    original = getattr(cls, name)
    label = f"{cls.__name__}.{name}"

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _spans.append((label, threading.current_thread().name, start, time.perf_counter()))

    setattr(cls, name, timed)


def install(out: str) -> None:
    import importlib

    for module, cls, method in STAGES:
        _wrap(getattr(importlib.import_module(module), cls), method)

    def dump() -> None:
        threads = {str(t.native_id): t.name for t in threading.enumerate()}
        with open(out, "w") as f:
            json.dump({"spans": _spans, "threads": threads}, f)

    atexit.register(dump)
    names: dict[str, str] = {}

    def note_threads() -> None:  # the names of threads that end before exit, for the CPU per thread
        while True:
            names.update({str(t.native_id): t.name for t in threading.enumerate()})
            with open(out + ".threads", "w") as f:
                json.dump(names, f)
            time.sleep(1.0)

    threading.Thread(target=note_threads, name="stage-clock", daemon=True).start()


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["edgefn", *sys.argv[2:]]
    from edgefn.cli.main import app

    app()
