"""Pre- and post-processing for functions, in pure Python (no numpy runs in the guest): tensors to and
from lists and bytes, softmax, argmax, top-k, normalising, and resizing an image.

Built into every Python function's component beside `edgefn_guest`, which re-exports all of it and adds
`tensor(...)`/`values(...)` for the WIT world's `Tensor`. Conversions are one `struct` call each (a C
loop; `array` from a list was twice as slow), little-endian whatever the CPU.

    from edgefn_guest import tensor, values, softmax, top_k
    result = host.infer("digits", [tensor(pixels, [1, 64])])
    best = top_k(values(result.outputs[1]), 3)        # [(index, probability), ...], best first
"""

import heapq
import math
import struct

# The element types of the WIT world's `dtype`, as `struct` codes (standard sizes with "<").
TYPECODES = {"float32": "f", "uint8": "B", "int8": "b", "int32": "i", "int64": "q"}
_SIZES = {dtype: struct.calcsize("<" + code) for dtype, code in TYPECODES.items()}


def pack(items, dtype="float32"):
    """Numbers -> the raw little-endian bytes of a tensor of `dtype`."""
    return struct.pack(f"<{len(items)}{TYPECODES[dtype]}", *items)


def unpack(data, dtype="float32"):
    """The raw little-endian bytes of a tensor of `dtype` -> a list of numbers."""
    return list(struct.unpack(f"<{len(data) // _SIZES[dtype]}{TYPECODES[dtype]}", data))


def rows(items, width):
    """A flat row-major list -> its rows of `width` (a batch's outputs, one row per event)."""
    return [items[i:i + width] for i in range(0, len(items), width)]


def argmax(items):
    """The index of the largest item (the first, on a tie)."""
    return max(range(len(items)), key=items.__getitem__)


def top_k(items, k):
    """The `k` largest items as (index, value), largest first (the first index, on a tie)."""
    if len(items) > 8 * k:  # a heap pays only on long lists: sorting ten items is 7x cheaper
        return heapq.nlargest(k, enumerate(items), key=lambda pair: pair[1])
    best = sorted(range(len(items)), key=items.__getitem__, reverse=True)[:k]
    return [(i, items[i]) for i in best]


def softmax(items):
    """Probabilities from logits (shifted by the largest, so no exp overflows)."""
    peak = max(items)
    exps = [math.exp(x - peak) for x in items]
    total = math.fsum(exps)
    return [e / total for e in exps]


def normalise(items, mean=None, std=None):
    """(x - mean) / std: with neither given, the items' own (standardising); a std of 0 leaves them centred."""
    if mean is None:
        mean = math.fsum(items) / len(items)
    if std is None:
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in items) / len(items))
    scale = 1.0 / std if std else 1.0
    return [(x - mean) * scale for x in items]


def rescale(items, low, high, new_low=0.0, new_high=1.0):
    """Map [low, high] onto [new_low, new_high] (pixels 0..255 -> 0..1)."""
    factor = (new_high - new_low) / (high - low)
    return [new_low + (x - low) * factor for x in items]


def resize(pixels, width, height, new_width, new_height, channels=1, bilinear=True):
    """A row-major image (`channels` interleaved values per pixel) resized to new_width x new_height,
    bilinear (or nearest), sampling at pixel centres as image libraries do."""
    if len(pixels) != width * height * channels:
        raise ValueError(f"{len(pixels)} values are not a {width}x{height} image of {channels} channel(s)")
    out = []
    sx, sy = width / new_width, height / new_height
    for y in range(new_height):
        fy = min(max((y + 0.5) * sy - 0.5, 0.0), height - 1)
        y0 = int(fy)
        y1, wy = min(y0 + 1, height - 1), fy - y0
        for x in range(new_width):
            fx = min(max((x + 0.5) * sx - 0.5, 0.0), width - 1)
            x0 = int(fx)
            x1, wx = min(x0 + 1, width - 1), fx - x0
            for c in range(channels):
                if not bilinear:
                    out.append(pixels[((y0 + (wy >= 0.5)) * width + x0 + (wx >= 0.5)) * channels + c])
                    continue
                top = pixels[(y0 * width + x0) * channels + c] * (1 - wx) + pixels[(y0 * width + x1) * channels + c] * wx
                bottom = pixels[(y1 * width + x0) * channels + c] * (1 - wx) + pixels[(y1 * width + x1) * channels + c] * wx
                out.append(top * (1 - wy) + bottom * wy)
    return out
