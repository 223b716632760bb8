"""Tensors as they cross the sandbox boundary: (dtype name, shape, raw little-endian bytes)."""

from __future__ import annotations

import math

import numpy as np

from edgefn.errors import ModelError

WireTensor = tuple[str, list[int], bytes]

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "uint8": np.dtype("u1"),
    "int8": np.dtype("i1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}


def from_wire(tensor: WireTensor) -> np.ndarray:
    dtype_name, shape, data = tensor
    dtype = DTYPES[dtype_name]
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise ModelError(f"tensor of shape {list(shape)} and dtype {dtype_name} needs "
                         f"{count * dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def to_wire(array: np.ndarray) -> WireTensor:
    array = np.asarray(array)
    name = _NAMES.get(array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype)
    if name is None:
        raise ModelError(f"model output dtype {array.dtype} cannot cross the boundary")
    return name, [int(d) for d in array.shape], np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
