"""The `digits` example function: classify an 8x8 handwritten digit with the model named like the
function (`digits`, an MLP; `examples/functions/digits-cnn` runs this same file with `digits-cnn`).

Input  (`sensors/<device>/<function>`): {"id": "<event id>", "pixels": [64 numbers, 0..16]}
Output (`results/<device>/<function>`): {"event_id", "label", "score", "function", "version",
                                         "ran_on", "latency_ms"}
A payload it cannot use is answered with an error; the daemon publishes it on
`edgefn/errors/<function>`.
"""

import json
import math
import struct
import time

from componentize_py_types import Err, Ok
from edgefn_guest import Function
from wit_world.imports import host
from wit_world.imports.types import Dtype, Message, Tensor

N_PIXELS = 64
_PACK = struct.Struct("<64f")
_info = None  # (name, version), asked once per instance


def _function_info():
    global _info
    if _info is None:
        info = host.info()
        _info = (info.name, info.version)
    return _info


def _pixels(payload: bytes):
    """The parsed document and its pixels packed as float32; Err says what is wrong."""
    try:  # MQTT JSON is UTF-8; json.loads(bytes) would guess UTF-16/32, codecs this Python lacks
        doc = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Err(f"payload is not JSON: {exc}") from None
    pixels = doc.get("pixels") if isinstance(doc, dict) else None
    if not isinstance(pixels, list) or len(pixels) != N_PIXELS:
        raise Err(f"payload must be a JSON object with 'pixels': a list of {N_PIXELS} numbers")
    try:  # builtins do the per-pixel checks in C; a non-number raises TypeError
        in_range = 0 <= min(pixels) and max(pixels) <= 16 and math.isfinite(math.fsum(pixels))
        packed = _PACK.pack(*pixels) if in_range else b""
    except (struct.error, TypeError, OverflowError):
        in_range = False
    if not in_range:
        raise Err("'pixels' must hold numbers from 0 to 16")
    return doc, packed


def _answer(event, doc, label, probs, ran_on):
    name, version = _function_info()
    out = {
        "event_id": str(doc.get("id", event.id)),
        "label": label,
        "score": round(probs[label], 6),
        "function": name,
        "version": version,
        "ran_on": ran_on,
        "latency_ms": round(time.time() * 1000.0 - event.received_ms, 3),
    }
    device = event.topic.split("/")[1]
    return [Message(f"results/{device}/{name}", json.dumps(out).encode())]


class WitWorld(Function):
    def handle(self, event):
        answer = self.handle_batch([event])[0]
        if isinstance(answer, Err):
            raise answer
        return answer.value

    def handle_batch(self, events):
        """One `infer` for every usable event of the batch; the others get their error."""
        answers, usable = [None] * len(events), []
        for i, event in enumerate(events):
            try:
                doc, packed = _pixels(event.payload)
                usable.append((i, doc, packed))
            except Err as err:
                answers[i] = err
        if usable:
            batch = b"".join(packed for _, _, packed in usable)
            try:
                model = _function_info()[0]  # the model is named like the function
                result = host.infer(model, [Tensor(Dtype.FLOAT32, [len(usable), N_PIXELS], batch)])
            except Err as err:
                for i, _, _ in usable:
                    answers[i] = err
                return answers
            label_t, probs_t = result.outputs
            labels = struct.unpack(f"<{len(usable)}q", label_t.data)
            probs = struct.unpack(f"<{len(probs_t.data) // 4}f", probs_t.data)
            classes = len(probs) // len(usable)
            for k, (i, doc, _) in enumerate(usable):
                row = probs[k * classes:(k + 1) * classes]
                answers[i] = Ok(_answer(events[i], doc, labels[k], row, result.ran_on))
        return answers
