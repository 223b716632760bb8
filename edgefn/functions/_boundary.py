"""The lean component boundary: calls into a component and host functions out of it.

wasmtime-py converts every component value element by element, asking the C API for the
value's type again at each step; a `list<u8>` of a few hundred bytes then costs hundreds of
microseconds. This module compiles, once per function type, a small codec tree that reads and
writes `wasmtime_component_val_t` slots by address, and moves byte lists in bulk through a
strided slice of the 32-byte slots. It depends on the C layout of wasmtime-py 50 (checked by
`_check_layout` at import), so the wasmtime version is pinned in pyproject.toml.

Python values on this side of the boundary:
  record -> tuple in field order        list<u8> -> bytes          other list -> list
  enum   -> case name (str)             option   -> value or None
  result -> (is_ok: bool, value)        string, bool, integers, floats -> themselves
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from ctypes import addressof, byref, c_size_t, c_uint8, c_void_p
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import _types as wt

__all__ = ["BoundaryError", "ExportCall", "add_host_func", "codec_for"]

MAX_BYTES = 16 << 20  # the largest byte list lifted from a guest
_SLOT = 32  # sizeof(wasmtime_component_val_t): a tag byte, then an 8-aligned union at +8
_ENTRY = 48  # sizeof(wasmtime_component_valrecord_entry_t): name vec (16 bytes), then the value
_K = {name: getattr(ffi, f"WASMTIME_COMPONENT_{name}").value for name in (
    "BOOL", "S8", "U8", "S16", "U16", "S32", "U32", "S64", "U64", "F32", "F64", "CHAR",
    "STRING", "LIST", "RECORD", "TUPLE", "ENUM", "OPTION", "RESULT")}


class BoundaryError(TypeError):
    """A value does not fit the component type it must cross as, or the type is unsupported."""


def _check_layout() -> None:
    val, entry = ffi.wasmtime_component_val_t, ffi.wasmtime_component_valrecord_entry_t
    layout = (ctypes.sizeof(val), val.of.offset, ctypes.sizeof(entry), entry.val.offset,
              ffi.wasmtime_component_valresult_t.val.offset)
    if layout != (_SLOT, 8, _ENTRY, 16, 8):
        raise ImportError(f"wasmtime C value layout changed: {layout}; pin wasmtime==50.*")


_check_layout()


# The same library loaded as a PyDLL: its calls keep the GIL. These helpers run for a few
# nanoseconds each, dozens of times per event; through a CDLL each call would release the GIL and
# then queue to get it back behind every other busy thread (up to the 5 ms switch interval).
_HOLDING_GIL = ctypes.PyDLL(ffi.dll._name)


def _cfunc(name: str, restype: Any, *argtypes: Any) -> Any:
    # A private function pointer, so wasmtime-py's own argtypes stay untouched.
    fn = _HOLDING_GIL[name]
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


_byte_vec_new = _cfunc("wasm_byte_vec_new", None, c_void_p, c_size_t, ctypes.c_char_p)
_vallist_new = _cfunc("wasmtime_component_vallist_new_uninit", None, c_void_p, c_size_t)
_valrecord_new = _cfunc("wasmtime_component_valrecord_new_uninit", None, c_void_p, c_size_t)
_val_new = _cfunc("wasmtime_component_val_new", c_void_p, c_void_p)
_val_delete = _cfunc("wasmtime_component_val_delete", None, c_void_p)
_error_new = _cfunc("wasmtime_error_new", c_void_p, ctypes.c_char_p)
_set_epoch_deadline = _cfunc("wasmtime_context_set_epoch_deadline", None, c_void_p, ctypes.c_uint64)

_u8_at = c_uint8.from_address
_u64_at = ctypes.c_uint64.from_address
_ptr_at = c_void_p.from_address


class Codec:
    """Writes a Python value into a value slot (`lower`) and reads one back (`lift`)."""

    def lower(self, value: Any, addr: int) -> None:
        raise NotImplementedError

    def lift(self, addr: int) -> Any:
        raise NotImplementedError


class _Scalar(Codec):
    def __init__(self, kind: str, ctype: Any, pytype: type | tuple[type, ...]):
        self.kind, self.ctype, self.pytype = _K[kind], ctype, pytype
        # ctypes silently wraps an integer that does not fit; the boundary must refuse it.
        self.bounds: tuple[int, int] | None = None
        if pytype is int and kind != "BOOL":
            bits = 8 * ctypes.sizeof(ctype)
            self.bounds = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kind[0] == "S" else (0, (1 << bits) - 1)

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, self.pytype):
            raise BoundaryError(f"expected {self.pytype}, got {type(value).__name__}")
        bounds = self.bounds
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise BoundaryError(f"{value} is out of range for {ctypes.sizeof(self.ctype) * 8}-bit integers")
        _u8_at(addr).value = self.kind
        self.ctype.from_address(addr + 8).value = value

    def lift(self, addr: int) -> Any:
        return self.ctype.from_address(addr + 8).value


def _read_vec(addr: int) -> bytes:
    size = _u64_at(addr).value
    return ctypes.string_at(_ptr_at(addr + 8).value, size) if size else b""


class _String(Codec):
    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, str):
            raise BoundaryError(f"expected str, got {type(value).__name__}")
        raw = value.encode()
        _u8_at(addr).value = _K["STRING"]
        _byte_vec_new(addr + 8, len(raw), raw)

    def lift(self, addr: int) -> Any:
        return _read_vec(addr + 8).decode()


class _Bytes(Codec):
    """`list<u8>` moved in bulk: each byte sits at offset 8 of its 32-byte slot, so a strided
    slice of a pre-tagged buffer fills (or reads) every slot in one C-level step."""

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise BoundaryError(f"expected bytes, got {type(value).__name__}")
        n = len(value)
        _u8_at(addr).value = _K["LIST"]
        _vallist_new(addr + 8, n)
        if n:
            slots = _u8_slots(n)
            slots[8::_SLOT] = value
            # A c_char array's .raw copies with the GIL held (ctypes.memmove would drop it).
            (ctypes.c_char * (n * _SLOT)).from_address(_ptr_at(addr + 16).value).raw = bytes(slots)

    def lift(self, addr: int) -> Any:
        n = _u64_at(addr + 8).value
        if not n:
            return b""
        if n > MAX_BYTES:  # each byte is a 32-byte slot on this side: refuse before copying
            raise BoundaryError(f"a byte list of {n} bytes exceeds the boundary's {MAX_BYTES} bytes")
        return ctypes.string_at(_ptr_at(addr + 16).value, n * _SLOT)[8::_SLOT]


_U8_TEMPLATE = bytearray(_SLOT * 4096)
_U8_TEMPLATE[0::_SLOT] = bytes([_K["U8"]]) * 4096


def _u8_slots(n: int) -> bytearray:
    """A fresh buffer of n slots, each already tagged U8 (callers fill offset 8)."""
    if n <= 4096:
        return _U8_TEMPLATE[: n * _SLOT]
    slots = bytearray(n * _SLOT)
    slots[0::_SLOT] = bytes([_K["U8"]]) * n
    return slots


class _List(Codec):
    def __init__(self, element: Codec):
        self.element = element

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, (list, tuple)):
            raise BoundaryError(f"expected list, got {type(value).__name__}")
        n = len(value)
        _u8_at(addr).value = _K["LIST"]
        _vallist_new(addr + 8, n)
        base = _ptr_at(addr + 16).value
        for i, item in enumerate(value):
            self.element.lower(item, base + i * _SLOT)

    def lift(self, addr: int) -> Any:
        n, base, lift = _u64_at(addr + 8).value, _ptr_at(addr + 16).value, self.element.lift
        return [lift(base + i * _SLOT) for i in range(n)]


class _Record(Codec):
    def __init__(self, fields: Sequence[tuple[str, Codec]]):
        self.names = [name.encode() for name, _ in fields]
        self.codecs = [codec for _, codec in fields]

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, tuple) or len(value) != len(self.codecs):
            raise BoundaryError(f"expected a tuple of {len(self.codecs)} fields, got {value!r:.80}")
        _u8_at(addr).value = _K["RECORD"]
        _valrecord_new(addr + 8, len(self.codecs))
        base = _ptr_at(addr + 16).value
        for i, (name, codec, item) in enumerate(zip(self.names, self.codecs, value, strict=True)):
            entry = base + i * _ENTRY
            _byte_vec_new(entry, len(name), name)
            codec.lower(item, entry + 16)

    def lift(self, addr: int) -> Any:
        base = _ptr_at(addr + 16).value
        return tuple(codec.lift(base + i * _ENTRY + 16) for i, codec in enumerate(self.codecs))


class _Enum(Codec):
    def __init__(self, names: Sequence[str]):
        self.names = {name: name.encode() for name in names}

    def lower(self, value: Any, addr: int) -> None:
        raw = self.names.get(value)
        if raw is None:
            raise BoundaryError(f"expected one of {sorted(self.names)}, got {value!r}")
        _u8_at(addr).value = _K["ENUM"]
        _byte_vec_new(addr + 8, len(raw), raw)

    def lift(self, addr: int) -> Any:
        return _read_vec(addr + 8).decode()


def _boxed(codec: Codec, value: Any) -> int:
    # Options and results hold their payload behind a heap pointer that wasmtime owns.
    tmp = ffi.wasmtime_component_val_t()
    codec.lower(value, addressof(tmp))
    return _val_new(addressof(tmp))  # moves the lowered value into the box


class _Option(Codec):
    def __init__(self, some: Codec):
        self.some = some

    def lower(self, value: Any, addr: int) -> None:
        _u8_at(addr).value = _K["OPTION"]
        _ptr_at(addr + 8).value = None if value is None else _boxed(self.some, value)

    def lift(self, addr: int) -> Any:
        ptr = _ptr_at(addr + 8).value
        return None if not ptr else self.some.lift(ptr)


class _Result(Codec):
    def __init__(self, ok: Codec | None, err: Codec | None):
        self.ok, self.err = ok, err

    def lower(self, value: Any, addr: int) -> None:
        if not isinstance(value, tuple) or len(value) != 2:
            raise BoundaryError(f"expected an (is_ok, value) pair, got {value!r:.80}")
        is_ok, payload = value
        codec = self.ok if is_ok else self.err
        _u8_at(addr).value = _K["RESULT"]
        _u8_at(addr + 8).value = bool(is_ok)
        _ptr_at(addr + 16).value = None if codec is None else _boxed(codec, payload)

    def lift(self, addr: int) -> Any:
        is_ok = bool(_u8_at(addr + 8).value)
        codec, ptr = (self.ok if is_ok else self.err), _ptr_at(addr + 16).value
        return is_ok, (codec.lift(ptr) if codec is not None and ptr else None)


_SCALARS: dict[type, Callable[[], Codec]] = {
    wt.Bool: lambda: _Scalar("BOOL", ctypes.c_bool, bool),
    wt.S8: lambda: _Scalar("S8", ctypes.c_int8, int),
    wt.U8: lambda: _Scalar("U8", ctypes.c_uint8, int),
    wt.S16: lambda: _Scalar("S16", ctypes.c_int16, int),
    wt.U16: lambda: _Scalar("U16", ctypes.c_uint16, int),
    wt.S32: lambda: _Scalar("S32", ctypes.c_int32, int),
    wt.U32: lambda: _Scalar("U32", ctypes.c_uint32, int),
    wt.S64: lambda: _Scalar("S64", ctypes.c_int64, int),
    wt.U64: lambda: _Scalar("U64", ctypes.c_uint64, int),
    wt.F32: lambda: _Scalar("F32", ctypes.c_float, (int, float)),
    wt.F64: lambda: _Scalar("F64", ctypes.c_double, (int, float)),
    wt.String: _String,
}


def codec_for(ty: Any) -> Codec:
    """Compile the codec for a wasmtime-py component value type (once per type, not per call)."""
    for cls, make in _SCALARS.items():
        if isinstance(ty, cls):
            return make()
    if isinstance(ty, wt.ListType):
        element = ty.element
        return _Bytes() if isinstance(element, wt.U8) else _List(codec_for(element))
    if isinstance(ty, wt.RecordType):
        return _Record([(name, codec_for(field)) for name, field in ty.fields])
    if isinstance(ty, wt.EnumType):
        return _Enum(ty.names)
    if isinstance(ty, wt.OptionType):
        return _Option(codec_for(ty.payload))
    if isinstance(ty, wt.ResultType):
        ok, err = ty.ok, ty.err
        return _Result(None if ok is None else codec_for(ok), None if err is None else codec_for(err))
    raise BoundaryError(f"component type {type(ty).__name__} is not supported at the edgefn boundary")


def _raise_call_error(err_ptr: Any) -> None:
    error = wasmtime.WasmtimeError._from_ptr(err_ptr)
    pending = _host_errors.take()
    if pending is not None:
        raise pending from error
    raise error


class ExportCall:
    """A component export bound to one store, with its codecs compiled once.

    Not thread-safe, like the store it belongs to: one instance runs one event at a time."""

    def __init__(self, store: wasmtime.Store, func: Any):
        fty = func.type(store)
        self._params = [codec_for(ty) for _, ty in fty.params]
        result = fty.result
        self._result = None if result is None else codec_for(result)
        # Everything a call passes to the C API is made once here, not per call.
        self._store = store
        self._context = store._context()
        self._func_ref = byref(func._func)
        self._n = len(self._params)
        self._args = (ffi.wasmtime_component_val_t * max(self._n, 1))()
        self._args_addr = addressof(self._args)
        self._ret = ffi.wasmtime_component_val_t()
        self._ret_addr = addressof(self._ret)
        self._ret_ref = byref(self._ret) if self._result else None

    def set_deadline(self, ticks: int) -> None:
        """Trap the next call once the engine's epoch has advanced `ticks` times from now."""
        _set_epoch_deadline(ctypes.cast(self._context, c_void_p), ticks)

    def __call__(self, *args: Any) -> Any:
        n, base = self._n, self._args_addr
        if len(args) != n:
            raise BoundaryError(f"expected {n} arguments, got {len(args)}")
        lowered = 0
        try:
            for i, (codec, arg) in enumerate(zip(self._params, args, strict=True)):
                codec.lower(arg, base + i * _SLOT)
                lowered += 1
            err = ffi.wasmtime_component_func_call(self._func_ref, self._context, self._args, n,
                                                   self._ret_ref, 1 if self._result else 0)
        finally:
            for i in range(lowered):
                _val_delete(base + i * _SLOT)
        if err:
            _raise_call_error(err)
        if self._result is None:
            return None
        try:
            return self._result.lift(self._ret_addr)
        finally:
            _val_delete(self._ret_addr)
            # wasmtime assigns the next result over this slot, dropping what it holds first:
            # leave a plain bool there, not the husk of the value just freed.
            _u8_at(self._ret_addr).value = _K["BOOL"]


class _HostErrors(threading.local):
    """The Python exception a host function raised, carried across the wasm frames to the caller
    (per thread: each sandbox instance runs on one worker thread at a time)."""

    pending: BaseException | None = None

    def take(self) -> BaseException | None:
        exc, self.pending = self.pending, None
        return exc


_host_errors = _HostErrors()


# Host functions stay alive as long as the process: linkers are built once per function.
_HOST_FUNCS: list[Any] = []
_no_finalizer = ctypes.CFUNCTYPE(None, c_void_p)(lambda _data: None)


def add_host_func(linker_instance: Any, name: str, func: Callable[..., Any]) -> None:
    """Define `name` in a wasmtime-py LinkerInstance, calling `func(*args)` with lifted values.

    An exception from `func` traps the guest; the caller of the export gets that exception.
    """
    codecs: list[tuple[list[Codec], Codec | None]] = []

    def trampoline(_data, _ctx, ty_raw, args, nargs, results, nresults):  # type: ignore[no-untyped-def]
        try:
            if not codecs:  # the type is fixed by the world; compile its codecs on first use
                with wt.FuncType._from_ptr(ty_raw, owner=object()) as fty:
                    res = fty.result
                    codecs.append(([codec_for(t) for _, t in fty.params],
                                   None if res is None else codec_for(res)))
            params, result = codecs[0]
            base = ctypes.cast(args, c_void_p).value or 0
            try:
                value = func(*[c.lift(base + i * _SLOT) for i, c in enumerate(params[:nargs])])
            finally:
                # The callee owns its arguments in wasmtime 50's C API.
                for i in range(nargs):
                    _val_delete(base + i * _SLOT)
            if result is not None and nresults:
                result.lower(value, ctypes.cast(results, c_void_p).value or 0)
            return 0
        except BaseException as exc:  # noqa: BLE001 - must not unwind through wasm frames
            _host_errors.pending = exc
            return _error_new(f"host function {name} failed: {exc}".encode())

    callback = ffi.wasmtime_component_func_callback_t(trampoline)
    _HOST_FUNCS.append(callback)
    raw = name.encode()
    err = ffi.wasmtime_component_linker_instance_add_func(
        linker_instance.ptr(), ctypes.create_string_buffer(raw), len(raw), callback, None,
        _no_finalizer)
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)
