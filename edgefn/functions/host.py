"""The host side of a function's sandbox: what the guest's `host` imports do (the `Host` protocol of
`edgefn.functions.sandbox`): inference here or on the cloud endpoint, the function's small state,
and its log (bounded: edgefn.observe.guestlog).

Where a batch's inference runs is the planner's decision, handed in per worker with `plan()`; a
cloud call that fails runs here instead, so no event is lost to the hand-off.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from edgefn.errors import CloudError, ModelError
from edgefn.inference.tensors import WireTensor as Tensor
from edgefn.observe.guestlog import BYTES_PER_S, LINES_PER_S, GuestLog

if TYPE_CHECKING:  # types only: `fn invoke` and the tests build a host without a cloud client or batcher
    from edgefn.functions.state import StateStore
    from edgefn.inference.batching import Batcher
    from edgefn.inference.registry import ModelRegistry
    from edgefn.observe.metrics import Metrics
    from edgefn.offload.client import CloudClient
    from edgefn.offload.planner import Where
    from edgefn.protocol.offload import Policy


class FunctionHost:
    """The host side of one function's sandbox: its models (here or on the cloud endpoint), its state
    and its log."""

    def __init__(self, name: str, registry: ModelRegistry, state: StateStore, cloud: CloudClient | None = None,
                 policy: Policy = "never", confidence: float = 0.5, metrics: Metrics | None = None,
                 batcher: Batcher | None = None, log_lines_per_s: int = LINES_PER_S,
                 log_bytes_per_s: int = BYTES_PER_S):
        self.name, self.registry, self.state = name, registry, state
        self.cloud, self.policy, self.confidence, self.metrics = cloud, policy, confidence, metrics
        # Through a batcher, concurrent calls of one model are stacked into one run (here or on the endpoint).
        self._infer_here = batcher.local if batcher is not None else registry.infer
        self._infer_there = None if cloud is None else batcher.cloud if batcher is not None else self._cloud_infer
        self._log = GuestLog(name, log_lines_per_s, log_bytes_per_s, metrics)  # bounded: a guest may log in a loop
        self._plan = threading.local()  # where this worker's current batch runs its inference
        self._usage = metrics.usage if metrics is not None else None  # metering of each infer call

    def plan(self, where: Where) -> None:
        """Where the inference of the batch this worker runs next goes (the planner's decision)."""
        self._plan.where = where

    def state_get(self, key: str) -> bytes | None:
        return self.state.get(self.name, key)

    def state_set(self, key: str, value: bytes) -> None:
        self.state.set(self.name, key, value)

    def infer(self, model: str, inputs: list[Tensor]) -> tuple[list[Tensor], str]:
        usage = self._usage
        if usage is None or not usage.enabled:
            return self._infer(model, inputs)
        started, cpu, where = time.perf_counter(), time.thread_time(), "local"  # a call that fails failed here
        try:
            answer = self._infer(model, inputs)
            where = answer[1]
            return answer
        finally:
            usage.inferred(self.name, where, time.perf_counter() - started, time.thread_time() - cpu)

    def _infer(self, model: str, inputs: list[Tensor]) -> tuple[list[Tensor], str]:
        if self.cloud is not None and getattr(self._plan, "where", "local") == "cloud":
            answer = self._on_cloud(model, inputs, "handed-off")
            if answer is not None:
                return answer, "cloud"
        outputs = self._infer_here(model, inputs)
        if self.cloud is not None and self.policy == "on-low-confidence" and _unsure(outputs, self.confidence):
            answer = self._on_cloud(model, inputs, "asked-again")  # joint inference: the cloud's model decides
            if answer is not None:
                return answer, "cloud"
        return outputs, "local"

    def _on_cloud(self, model: str, inputs: list[Tensor], why: str) -> list[Tensor] | None:
        """The cloud's answer, or None (breaker open, endpoint away or refusing): then it runs here. The
        client has said why in its log (the first failure of each kind, then rate-limited)."""
        assert self._infer_there is not None
        try:
            answer = self._infer_there(model, inputs)
        except CloudError as exc:
            self._count("ran-here-instead", exc.reason)
            return None
        self._count(why)
        return answer

    def _cloud_infer(self, model: str, inputs: list[Tensor]) -> list[Tensor]:
        """One call to the endpoint without a batcher, named and read by the local model.json."""
        assert self.cloud is not None
        try:
            contract = self.registry.info(model)
        except ModelError:
            contract = None  # known only there
        return self.cloud.infer(model, inputs, contract=contract)

    def _count(self, outcome: str, reason: str = "") -> None:
        if self.metrics is not None:
            self.metrics.offload.labels(self.name, outcome, reason).inc()

    def log(self, level: int, message: str) -> None:
        self._log.write(level, message)


def _unsure(outputs: list[Tensor], threshold: float) -> bool:
    """Whether a local answer's top score is below `threshold` for any row (the first [N, classes]
    float32 output holds the scores)."""
    for dtype, shape, data in outputs:
        if dtype == "float32" and len(shape) == 2 and shape[0] > 0 and shape[1] > 0:
            scores = np.frombuffer(data, dtype="<f4").reshape(shape)
            return bool(scores.max(axis=1).min() < threshold)
    return False
