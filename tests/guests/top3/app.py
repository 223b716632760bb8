"""Top-3 digits, written with edgefn_guest's tensor tools: {"pixels": [64 numbers, 0..16]} ->
{"top3": [[label, probability], ...]}. The payload "bench" times, inside the guest, the pre- and
post-processing of one event written with the tools against the same written by hand with struct
(as the digits example does): {"tools_us": ..., "by_hand_us": ...}.
"""

import json
import struct
import time

from componentize_py_types import Err
from edgefn_guest import Function, tensor, top_k, values
from wit_world.imports import host
from wit_world.imports.types import Dtype, Message, Tensor

_PACK = struct.Struct("<64f")


def with_tools(pixels, probabilities_of):
    probs = values(probabilities_of(tensor(pixels, [1, 64])))
    return [[label, round(p, 6)] for label, p in top_k(probs, 3)]


def by_hand(pixels, probabilities_of):
    data = probabilities_of(Tensor(Dtype.FLOAT32, [1, 64], _PACK.pack(*pixels))).data
    probs = struct.unpack(f"<{len(data) // 4}f", data)
    best = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:3]
    return [[label, round(probs[label], 6)] for label in best]


def _infer(t):
    return host.infer("digits", [t]).outputs[1]


class WitWorld(Function):
    def handle(self, event):
        text = bytes(event.payload).decode()
        device = event.topic.split("/")[1]
        if text == "bench":
            pixels = [float(i % 17) for i in range(64)]
            fixed = Tensor(Dtype.FLOAT32, [1, 10], struct.pack("<10f", *[i / 45 for i in range(10)]))
            timings = {}
            for name, way in (("tools_us", with_tools), ("by_hand_us", by_hand)):
                started = time.perf_counter()
                for _ in range(2000):
                    way(pixels, lambda t: fixed)  # the processing alone, not the model
                timings[name] = round((time.perf_counter() - started) / 2000 * 1e6, 2)
            return [Message(f"results/{device}/top3", json.dumps(timings).encode())]
        try:
            pixels = json.loads(text)["pixels"]
        except (ValueError, KeyError, TypeError) as exc:
            raise Err(f"payload must be JSON with 'pixels': {exc}") from None
        doc = {"top3": with_tools(pixels, _infer)}
        return [Message(f"results/{device}/top3", json.dumps(doc).encode())]
