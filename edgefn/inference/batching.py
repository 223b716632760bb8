"""Micro-batching: concurrent `infer` calls of one model variant, here or on the cloud endpoint, run
as one inference over their inputs stacked along the batch dimension.

    worker A: infer(m, 8 rows) --+                       +--> A's 8 rows of every output
    worker B: infer(m, 3 rows) --+--> one run, 11 rows --+--> B's 3 rows
    worker C: infer(m, 5 rows) --+                       +--> C's 5 rows

A `Coalescer` serves one (model, variant, where) and lets at most `runners` runs go at once (the
cores here; requests in flight to the endpoint). The first call of a batch leads it: while every
runner is busy with other calls it waits, at most `wait_s`, and the calls arriving meanwhile join
its batch. With a runner free it runs at once: a lone call on an idle device pays no wait, and a
busy device never leaves a core idle to gather a batch (the CNNs here cost per row what they cost
alone, so their gain is in the per-call overhead, never worth an idle core). Followers join an open
batch whose inputs have the same dtypes and trailing dimensions; other shapes form batches of their
own. A batch closes at `max_calls` calls.

An error of a batched run reaches every caller of the batch: the inputs were checked to stack
cleanly, so what fails is the model or the endpoint, and it would fail each call again (running
them one by one would multiply the requests to an endpoint that is failing already).

Only models whose every input has a free first dimension are batched; a model whose outputs do not
come back with one row per input row is run one call at a time from then on.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgefn.errors import ModelError
from edgefn.inference.tensors import DTYPES, WireTensor

if TYPE_CHECKING:
    from edgefn.inference.model import ModelInfo, TensorSpec
    from edgefn.inference.registry import ModelRegistry
    from edgefn.offload.client import CloudClient

Run = Callable[[list[WireTensor]], list[WireTensor]]
# What stacks with what: per input, its dtype and its shape past the batch dimension.
Signature = tuple[tuple[str, tuple[int, ...]], ...]

DEFAULT_MAX_CALLS = 16
DEFAULT_WAIT_S = 0.002
DEFAULT_CLOUD_RUNNERS = 4  # requests in flight to the endpoint before calls wait to share one


def cores() -> int:
    """The cores this process may run on: as many local runs as go in parallel."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def signature(inputs: Sequence[WireTensor]) -> tuple[Signature, int] | None:
    """The inputs' signature and their row count, or None where they cannot be stacked with others:
    no inputs, a scalar, inputs of different row counts, or bytes that do not fill the shape (stacking
    those would shift every later caller's rows)."""
    if not inputs:
        return None
    rows = None
    parts = []
    for dtype, shape, data in inputs:
        np_dtype = DTYPES.get(dtype)
        if np_dtype is None or not shape or shape[0] < 1 or (rows is not None and shape[0] != rows):
            return None
        if math.prod(shape) * np_dtype.itemsize != len(data):
            return None
        rows = shape[0]
        parts.append((dtype, tuple(shape[1:])))
    assert rows is not None
    return tuple(parts), rows


def stack(calls: Sequence[Sequence[WireTensor]]) -> list[WireTensor]:
    """The calls' inputs concatenated along the batch dimension (wire tensors are C-ordered bytes, so
    this is a join of their bytes)."""
    stacked = []
    for position, (dtype, shape, _) in enumerate(calls[0]):
        rows = sum(call[position][1][0] for call in calls)
        stacked.append((dtype, [rows, *shape[1:]], b"".join(call[position][2] for call in calls)))
    return stacked


def split(outputs: Sequence[WireTensor], rows: Sequence[int]) -> list[list[WireTensor]] | None:
    """Each caller's share of the batch's outputs, by its row count; None when an output does not
    have one row per input row (nothing says which part is whose)."""
    total = sum(rows)
    shares: list[list[WireTensor]] = [[] for _ in rows]
    for dtype, shape, data in outputs:
        if not shape or shape[0] != total or len(data) % total:
            return None
        row_bytes, start = len(data) // total, 0
        view = memoryview(data)
        for share, n in zip(shares, rows, strict=True):
            share.append((dtype, [n, *shape[1:]], bytes(view[start:start + n * row_bytes])))
            start += n * row_bytes
    return shares


@dataclass(eq=False)
class _Batch:
    signature: Signature
    calls: list[list[WireTensor]]
    rows: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    results: list[list[WireTensor]] | None = None
    error: BaseException | None = None


class Coalescer:
    """Stacks the concurrent calls of one model variant (here or on the endpoint) into one run.

    `run` does one inference; `batchable` says whether the model takes a batch dimension; `runners`
    how many runs may go at once before a call waits to share one; `on_batch(calls)` hears how many
    calls each run served (1 for a call that ran alone)."""

    def __init__(self, run: Run, *, batchable: bool = True, max_calls: int = DEFAULT_MAX_CALLS,
                 wait_s: float = DEFAULT_WAIT_S, runners: int | None = None,
                 on_batch: Callable[[int], None] | None = None):
        runners = cores() if runners is None else runners
        if max_calls < 1 or wait_s < 0 or runners < 1:
            raise ValueError("max_calls and runners must be 1 or more, wait_s 0 or more")
        self._run, self.batchable, self.max_calls, self.wait_s = run, batchable, max_calls, wait_s
        self.runners = runners
        self._on_batch = on_batch or (lambda calls: None)
        self._cond = threading.Condition()
        self._open: dict[Signature, _Batch] = {}  # batches whose leader still takes followers
        self._running = 0  # runs going on now

    def infer(self, inputs: list[WireTensor]) -> list[WireTensor]:
        shape = signature(inputs) if self.batchable and self.max_calls > 1 else None
        if shape is None:
            with self._cond:
                self._running += 1
            try:
                return self._alone(inputs)
            finally:
                self._ran()
        sig, rows = shape
        with self._cond:
            batch = self._open.get(sig)
            leader = batch is None
            if batch is None:
                batch = self._open[sig] = _Batch(sig, [inputs], [rows])
            else:
                batch.calls.append(inputs)
                batch.rows.append(rows)
                if len(batch.calls) >= self.max_calls:
                    del self._open[sig]  # full: the next call leads a new batch
                self._cond.notify_all()
            index = len(batch.calls) - 1
        if leader:
            self._lead(batch)
        else:
            batch.done.wait()
        if batch.error is not None:  # the leader raises the error itself, with its traceback
            raise batch.error if leader else _own_copy(batch.error)
        assert batch.results is not None
        return batch.results[index]

    def _alone(self, inputs: list[WireTensor]) -> list[WireTensor]:
        outputs = self._run(inputs)
        self._on_batch(1)
        return outputs

    def _lead(self, batch: _Batch) -> None:
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while len(batch.calls) < self.max_calls and self._running >= self.runners:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._open.get(batch.signature) is batch:
                del self._open[batch.signature]  # closed: later calls start a batch of their own
            self._running += 1
        try:
            batch.results = self._run_batch(batch)
        except Exception as exc:  # every caller of the batch gets it
            batch.error = exc
        finally:
            if batch.results is None and batch.error is None:  # the leader's thread is being torn down
                batch.error = ModelError("the inference of this batch was interrupted")
            self._ran()
            batch.done.set()

    def _ran(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()  # a leader waiting for a free runner takes it

    def _run_batch(self, batch: _Batch) -> list[list[WireTensor]]:
        if len(batch.calls) == 1:
            return [self._alone(batch.calls[0])]
        shares = split(self._run(stack(batch.calls)), batch.rows)
        if shares is None:
            self.batchable = False  # the outputs do not follow the batch dimension: never stack again
            return [self._alone(call) for call in batch.calls]
        self._on_batch(len(batch.calls))
        return shares


def _own_copy(exc: BaseException) -> BaseException:
    """A copy of the batch's error for one caller, so callers in other threads do not share (and
    extend) one traceback."""
    try:
        return copy.copy(exc).with_traceback(None)
    except Exception:
        return exc


class Batcher:
    """The coalescers of a registry's models: one per (model, where), shared by every function loaded
    with that registry (the variant a registry runs a model as never changes).

    `local(model, inputs)` runs on this device through `registry`; `cloud(model, inputs)` through
    `cloud` (one OIP request per batch). `max_calls` 1 turns micro-batching off. `runners` runs here
    (default: the cores) and `cloud_runners` requests go at once before calls wait to share one.
    `on_batch(model, where, calls)` hears each run's number of calls (the batch-size histogram)."""

    def __init__(self, registry: ModelRegistry, cloud: CloudClient | None = None, *, max_calls: int = DEFAULT_MAX_CALLS,
                 wait_s: float = DEFAULT_WAIT_S, runners: int | None = None,
                 cloud_runners: int = DEFAULT_CLOUD_RUNNERS,
                 on_batch: Callable[[str, str, int], None] | None = None):
        self.registry, self.cloud_client = registry, cloud
        self.max_calls, self.wait_s = max_calls, wait_s
        self.runners, self.cloud_runners = runners, cloud_runners
        self._on_batch = on_batch
        self._coalescers: dict[tuple[str, str], Coalescer] = {}
        self._lock = threading.Lock()

    def local(self, model: str, inputs: list[WireTensor]) -> list[WireTensor]:
        return self._coalescer(model, "local").infer(inputs)

    def cloud(self, model: str, inputs: list[WireTensor]) -> list[WireTensor]:
        return self._coalescer(model, "cloud").infer(inputs)

    def _coalescer(self, model: str, where: str) -> Coalescer:
        key = (model, where)
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            with self._lock:
                coalescer = self._coalescers.get(key)
                if coalescer is None:
                    coalescer = self._coalescers[key] = self._make(model, where)
        return coalescer

    def _make(self, model: str, where: str) -> Coalescer:
        registry, client = self.registry, self.cloud_client
        if where == "local":
            specs: Sequence[TensorSpec] = registry.get(model).inputs
            run: Run = lambda inputs: registry.infer(model, inputs)  # noqa: E731
        else:
            if client is None:
                raise ModelError(f"model {model}: no cloud endpoint to run it on")
            try:
                contract: ModelInfo | None = registry.info(model)  # model.json: the contract both ends share
            except ModelError:
                contract = None  # a model known only there: nothing says it takes a batch dimension
            specs = contract.inputs if contract is not None else ()
            run = lambda inputs: client.infer(model, inputs, contract=contract)  # noqa: E731
        batchable = bool(specs) and all(spec.shape and spec.shape[0] < 0 for spec in specs)
        on_batch = self._on_batch
        return Coalescer(run, batchable=batchable, max_calls=self.max_calls, wait_s=self.wait_s,
                         runners=self.runners if where == "local" else self.cloud_runners, on_batch=(lambda calls: on_batch(model, where, calls)) if on_batch else None)
