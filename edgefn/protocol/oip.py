"""The Open Inference Protocol v2 (KServe V2) REST wire format, with Triton's binary tensor data extension.

Shared by the edge's client (`edgefn.offload.client`) and the reference endpoint (`cloud_sync.serve`),
so both speak exactly the same dialect:

- a tensor is `{"name", "datatype", "shape", "data"}` with `data` the elements in row-major order
  (flat, or nested as the shape; written flat);
- with the binary extension a tensor carries `"parameters": {"binary_data_size": N}` instead of `data`,
  its N raw little-endian bytes follow the JSON object in the body, in the order of the tensors, and the
  `Inference-Header-Content-Length` header gives the length of the JSON object;
- an output is asked for as binary with `"parameters": {"binary_data": true}`, or all of them with the
  request's `"parameters": {"binary_data_output": true}`.

An answer other than 200 is an `OipError` with its HTTP `status` (the `edgefn.errors.HttpStatus` mixin,
as CloudError and FleetError carry theirs) and the text of its `{"error": ...}` body. Anything malformed
is its `ProtocolError` saying what is wrong: a 400 (server), or a CloudError (client).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgefn.errors import HttpStatus

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
EXTENSIONS = ("binary_tensor_data",)

# OIP datatype names and the little-endian numpy dtypes of their binary form. BYTES (length-prefixed
# strings) has no use for these models and is refused.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
# Some servers answer with numpy's names ("float32", "int64") where the protocol says FP32, INT64: a client
# accepts those in answers (`lenient`); requests and this side's answers use the protocol's names only.
NUMPY_NAMES: dict[str, str] = {dtype.name: name for name, dtype in DATATYPES.items()}


class OipError(HttpStatus, Exception):
    """An answer other than 200: its HTTP `status` (500 unless given) and the `error` text."""

    default_status = 500


class ProtocolError(OipError, ValueError):
    """A message that does not follow the protocol (or asks for what this side cannot do): a 400."""

    default_status = 400


def datatype(dtype: np.dtype | str) -> str:
    """The OIP name of a numpy dtype (or of a dtype name such as "float32")."""
    dtype = np.dtype(dtype)
    name = _NAMES.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if name is None:
        raise ProtocolError(f"dtype {dtype} has no Open Inference Protocol datatype")
    return name


def dtype_of(name: Any, lenient: bool = False) -> np.dtype:
    """The numpy dtype of an OIP datatype name (or, `lenient`, of numpy's name for it)."""
    if lenient and isinstance(name, str):
        name = NUMPY_NAMES.get(name, name)
    dtype = DATATYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"datatype {name!r} is not supported (supported: {', '.join(DATATYPES)})")
    return dtype


def encode_body(head: Mapping[str, Any], blobs: Sequence[bytes]) -> tuple[bytes, dict[str, str]]:
    """A request or response body and its headers: the JSON object, then the binary tensors, if any."""
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return text, {"Content-Type": JSON_TYPE}
    return b"".join((text, *blobs)), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(text))}


# The JSON part of a body: Python objects cost ~10x its bytes (a 60 MiB array of numbers took 1.3 GB), so
# it is bounded far below a whole body; large tensors travel as binary data, which costs its bytes.
MAX_JSON_BYTES = 8 << 20


def decode_body(body: bytes, header_length: str | None,
                max_json_bytes: int = MAX_JSON_BYTES) -> tuple[dict[str, Any], memoryview]:
    """(JSON object, the binary data after it) of a body; `header_length` is Inference-Header-Content-Length.
    A JSON part over `max_json_bytes` is refused (OipError 413), and so is one nested past the parser's
    depth (ProtocolError)."""
    view = memoryview(body)
    if header_length is None:
        size = len(view)
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < size <= len(view):
            raise ProtocolError(f"{HEADER_LENGTH} is {size} but the body has {len(view)} bytes")
    if size > max_json_bytes:
        raise ProtocolError(f"the JSON part of the body is larger than {max_json_bytes} bytes: send large tensors as "
                            "binary data (binary_data_size)", status=413)
    try:
        head = json.loads(body if header_length is None else view[:size].tobytes())  # JSON only: no copy
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the body is not a JSON object: {exc}") from None
    except RecursionError:
        raise ProtocolError("the body is not a JSON object a server takes: nested too deeply") from None
    if not isinstance(head, dict):
        raise ProtocolError(f"the body must be a JSON object, got {type(head).__name__}")
    return head, view[size:]


def tensor_entry(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """A tensor's JSON entry, and its bytes when it travels as binary data (else None)."""
    entry: dict[str, Any] = {"name": name, "datatype": datatype(array.dtype), "shape": [int(d) for d in array.shape]}
    if binary:
        blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        entry["parameters"] = {"binary_data_size": len(blob)}
        return entry, blob
    entry["data"] = np.asarray(array).ravel().tolist()
    return entry, None


def read_tensors(entries: Any, rest: memoryview, kind: str,
                 lenient: bool = False) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """(name, array, parameters) of each tensor entry of `kind` ("inputs" or "outputs"), its binary data
    taken from `rest` in order; every byte of `rest` must belong to one of them. `lenient`: numpy's
    datatype names are taken too (a client reading other servers' answers)."""
    if not isinstance(entries, list):
        raise ProtocolError(f"'{kind}' must be a JSON array")
    tensors, offset = [], 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(f"{kind}[{index}] must be an object with a 'name'")
        name = entry["name"]
        what = f"{kind[:-1]} {name!r}"
        params = parameters(entry, what)
        dtype, shape = dtype_of(entry.get("datatype"), lenient), _shape(entry.get("shape"), what)
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in entry:
                raise ProtocolError(f"{what} has both 'data' and binary_data_size")
            array, offset = _binary_array(rest, offset, size, dtype, shape, what), offset + size
        elif "data" in entry:
            array = _json_array(entry["data"], dtype, what)
        else:
            raise ProtocolError(f"{what} has neither 'data' nor binary_data_size")
        if array.size != math.prod(shape):
            raise ProtocolError(f"{what}: shape {shape} holds {math.prod(shape)} elements, 'data' has {array.size}")
        tensors.append((name, array.reshape(shape), params))
    if offset != len(rest):
        raise ProtocolError(f"the body holds {len(rest)} bytes of binary data, the tensors' binary_data_size "
                            f"add up to {offset}")
    return tensors


def parameters(doc: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The `parameters` object of a request, tensor or requested output ({} when absent, or null as KServe
    writes it)."""
    params = doc.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{what}: 'parameters' must be a JSON object")
    if "shared_memory_region" in params:
        raise ProtocolError(f"{what}: the shared memory extension is not supported")
    return params


def _shape(shape: Any, what: str) -> list[int]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"{what}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _binary_array(rest: memoryview, offset: int, size: Any, dtype: np.dtype, shape: list[int],
                  what: str) -> np.ndarray:
    if type(size) is not int or size < 0:
        raise ProtocolError(f"{what}: binary_data_size must be a non-negative integer, got {size!r}")
    if size != math.prod(shape) * dtype.itemsize:
        raise ProtocolError(f"{what}: shape {shape} of {datatype(dtype)} needs {math.prod(shape) * dtype.itemsize} "
                            f"bytes, binary_data_size says {size}")
    if offset + size > len(rest):
        raise ProtocolError(f"{what}: binary_data_size {size} runs past the end of the body")
    array = np.frombuffer(rest[offset:offset + size], dtype=dtype)
    return array if array.flags.aligned else array.copy()


def _json_array(data: Any, dtype: np.dtype, what: str) -> np.ndarray:
    """JSON numbers as `dtype`, refusing what would change their value (2.5 as INT64, 300 as UINT8)."""
    if not isinstance(data, list):
        raise ProtocolError(f"{what}: 'data' must be a JSON array")
    try:
        raw = np.asarray(data)
    except ValueError:
        raise ProtocolError(f"{what}: 'data' is ragged (nested lists of different lengths)") from None
    if raw.size == 0:
        return np.empty(0, dtype)
    if raw.dtype.kind not in "biuf" or (dtype.kind == "b") != (raw.dtype.kind == "b"):
        expected = "booleans" if dtype.kind == "b" else "numbers"
        raise ProtocolError(f"{what}: 'data' of {datatype(dtype)} must hold {expected}")
    if dtype.kind in "iu":
        if raw.dtype.kind == "f":
            raise ProtocolError(f"{what}: 'data' of {datatype(dtype)} must hold integers")
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ProtocolError(f"{what}: 'data' holds values outside {datatype(dtype)}'s range")
    return raw.astype(dtype, copy=False).ravel()
