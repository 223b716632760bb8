"""The boundary codecs on their own: lower a Python value into a real wasmtime value slot, lift it
back, and free it through wasmtime's own destructor."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wasmtime import _ffi as ffi

from edgefn.functions._boundary import (
    BoundaryError,
    Codec,
    _Bytes,
    _Enum,
    _List,
    _Option,
    _Record,
    _Result,
    _Scalar,
    _String,
    _val_delete,
)


def roundtrip(codec: Codec, value: Any) -> Any:
    slot = ffi.wasmtime_component_val_t()
    addr = ctypes.addressof(slot)
    codec.lower(value, addr)
    try:
        return codec.lift(addr)
    finally:
        _val_delete(addr)  # frees everything the lowering allocated (boxes, vectors, entries)


def lower_fails(codec: Codec, value: Any) -> BoundaryError:
    slot = ffi.wasmtime_component_val_t()
    with pytest.raises(BoundaryError) as info:
        codec.lower(value, ctypes.addressof(slot))
    return info.value


def u32() -> _Scalar:
    return _Scalar("U32", ctypes.c_uint32, int)


def dtype() -> _Enum:
    return _Enum(["float32", "uint8", "int8", "int32", "int64"])


def tensor() -> _Record:
    return _Record([("dtype", dtype()), ("shape", _List(u32())), ("data", _Bytes())])


def message() -> _Record:
    return _Record([("topic", _String()), ("payload", _Bytes())])


# --- round-trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "results/dev1/digits", "héllo wörld", "数字 🙂 ∑", "a\x00b", "x" * 10_000])
def test_string_roundtrip_unicode(text: str):
    assert roundtrip(_String(), text) == text


@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 10_000])
def test_bytes_roundtrip_sizes(size: int):
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    lifted = roundtrip(_Bytes(), data)
    assert type(lifted) is bytes
    assert lifted == data


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_bytes_roundtrip_buffer_types(kind: type):
    assert roundtrip(_Bytes(), kind(b"\x00\x01\xfe\xff")) == b"\x00\x01\xfe\xff"


def test_bytes_lowering_leaves_template_clean():
    # Small lists reuse a pre-tagged template; writing one must not leak into the next.
    assert roundtrip(_Bytes(), b"\xaa" * 100) == b"\xaa" * 100
    assert roundtrip(_Bytes(), b"\x00" * 100) == b"\x00" * 100


@pytest.mark.parametrize(("codec", "value"), [
    (_Scalar("BOOL", ctypes.c_bool, bool), True),
    (_Scalar("BOOL", ctypes.c_bool, bool), False),
    (_Scalar("U8", ctypes.c_uint8, int), 255),
    (_Scalar("S8", ctypes.c_int8, int), -128),
    (_Scalar("U16", ctypes.c_uint16, int), 65535),
    (_Scalar("S32", ctypes.c_int32, int), -(2**31)),
    (u32(), 2**32 - 1),
    (_Scalar("S64", ctypes.c_int64, int), -(2**63)),
    (_Scalar("U64", ctypes.c_uint64, int), 2**64 - 1),
    (_Scalar("F64", ctypes.c_double, (int, float)), 1712345678901.25),
    (_Scalar("F32", ctypes.c_float, (int, float)), 0.5),
], ids=lambda v: repr(v) if not isinstance(v, Codec) else type(v).__name__)
def test_scalar_roundtrip_limits(codec: Codec, value: Any):
    assert roundtrip(codec, value) == value


def test_record_roundtrip_field_order():
    event = _Record([("id", _String()), ("topic", _String()), ("payload", _Bytes()),
                     ("received-ms", _Scalar("F64", ctypes.c_double, (int, float)))])
    value = ("e-1", "sensors/dev1/digits", b'{"pixels": []}', 1712345678901.5)
    assert roundtrip(event, value) == value


def test_record_roundtrip_nested():
    inference = _Record([("outputs", _List(tensor())), ("ran-on", _String())])
    value = ([("int64", [1], (7).to_bytes(8, "little")), ("float32", [1, 10], b"\x00" * 40)], "local")
    assert roundtrip(inference, value) == value


@pytest.mark.parametrize("case", ["float32", "uint8", "int8", "int32", "int64"])
def test_enum_roundtrip_each_case(case: str):
    assert roundtrip(dtype(), case) == case


@pytest.mark.parametrize("value", [None, b"", b"state", b"\x00" * 5000])
def test_option_roundtrip_some_and_none(value: bytes | None):
    assert roundtrip(_Option(_Bytes()), value) == value


def test_option_roundtrip_record():
    codec = _Option(_Record([("name", _String()), ("version", _String())]))
    assert roundtrip(codec, ("digits", "1.0.0")) == ("digits", "1.0.0")
    assert roundtrip(codec, None) is None


@pytest.mark.parametrize("value", [
    (True, [("results/dev1/digits", b'{"label": 3}')]),
    (True, []),
    (False, "payload is not JSON"),
    (False, ""),
])
def test_result_roundtrip_ok_and_err(value: tuple[bool, Any]):
    assert roundtrip(_Result(_List(message()), _String()), value) == value


def test_result_roundtrip_without_payload_types():
    assert roundtrip(_Result(None, None), (True, None)) == (True, None)
    assert roundtrip(_Result(None, None), (False, None)) == (False, None)
    assert roundtrip(_Result(None, _String()), (False, "nope")) == (False, "nope")
    assert roundtrip(_Result(u32(), None), (True, 7)) == (True, 7)


def test_list_of_records_roundtrip():
    messages = [(f"results/dev{i}/digits", bytes([i]) * i) for i in range(50)]
    assert roundtrip(_List(message()), messages) == messages
    assert roundtrip(_List(message()), []) == []


def test_list_roundtrip_accepts_tuple():
    assert roundtrip(_List(u32()), (1, 64)) == [1, 64]
    assert roundtrip(_List(_String()), ("a", "ü")) == ["a", "ü"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20_000))
def test_bytes_roundtrip_property(data: bytes):
    assert roundtrip(_Bytes(), data) == data


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="utf-8")))
def test_string_roundtrip_property(text: str):
    assert roundtrip(_String(), text) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(codec="utf-8"), max_size=40), st.binary(max_size=300)), max_size=20))
def test_messages_roundtrip_property(messages: list[tuple[str, bytes]]):
    codec = _Result(_List(message()), _String())
    assert roundtrip(codec, (True, messages)) == (True, messages)


# --- values that do not fit --------------------------------------------------------------------


@pytest.mark.parametrize(("codec", "value"), [
    (_String(), b"bytes, not str"),
    (_String(), 3),
    (_Bytes(), "str, not bytes"),
    (_Bytes(), [1, 2, 3]),
    (u32(), "7"),
    (u32(), 7.0),
    (_Scalar("F64", ctypes.c_double, (int, float)), "1.0"),
    (_List(u32()), "abc"),
    (_List(u32()), b"abc"),
    (_List(u32()), {1, 2}),
    (_Record([("a", _String())]), ["list", "not tuple"]),
    (_Record([("a", _String())]), "a"),
    (dtype(), 3),
], ids=lambda v: repr(v)[:30] if not isinstance(v, Codec) else type(v).__name__)
def test_type_error_wrong_python_type(codec: Codec, value: Any):
    lower_fails(codec, value)


def test_type_error_wrong_enum_case():
    error = lower_fails(dtype(), "float64")
    assert "float64" in str(error) and "float32" in str(error)


@pytest.mark.parametrize("value", [(), ("topic",), ("topic", b"payload", "extra")])
def test_type_error_wrong_record_arity(value: tuple):
    error = lower_fails(message(), value)
    assert "2 fields" in str(error)


@pytest.mark.parametrize("value", [True, (True,), (True, [], "extra"), None])
def test_type_error_wrong_result_shape(value: Any):
    lower_fails(_Result(_List(message()), _String()), value)


@pytest.mark.parametrize(("codec", "value"), [
    (u32(), -1),
    (u32(), 2**32),
    (_Scalar("U8", ctypes.c_uint8, int), 256),
    (_Scalar("S8", ctypes.c_int8, int), -129),
    (_Scalar("U64", ctypes.c_uint64, int), 2**64),
    (_Scalar("S64", ctypes.c_int64, int), 2**63),
], ids=lambda v: repr(v) if not isinstance(v, Codec) else type(v).__name__)
def test_type_error_integer_out_of_range(codec: Codec, value: int):
    # ctypes would silently wrap it (a shape of 2**32 + 1 would cross as 1).
    lower_fails(codec, value)


def test_type_error_in_nested_value_is_boundary_error():
    lower_fails(_List(message()), [("ok", b"ok"), ("bad", "not bytes")])
    lower_fails(_Option(_Bytes()), "not bytes")
    lower_fails(_Result(_String(), _String()), (False, 42))


def test_boundary_error_is_a_type_error():
    assert issubclass(BoundaryError, TypeError)
