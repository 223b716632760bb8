"""The checks a function's source gets on the host before componentize-py runs (which takes 10 s and
more): syntax, and what it imports. Each problem is one line naming the real file and line; what
would fail only in the guest (a native extension such as numpy, a module WASI lacks) is refused here,
saying why.

What a guest can import: the standard library of CPython built for WASI (less the modules below),
the function's own modules, `edgefn_guest`, the bindings componentize-py generates, and pure-Python
packages installed in the Python that builds it (they are bundled into the component).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgefn.errors import BuildError

# Standard modules a function's own code may not import. Measured with componentize-py 0.25: the
# first ones are not in CPython for WASI (the build fails, 10 s later, on a missing `_ssl`, ...); the
# others import, and then fail on every use. (sqlite3 works, in memory; threading imports, but no
# thread can start.)
_NOT_IN_WASI = "not in CPython for WASI"
REFUSED = {
    "ssl": _NOT_IN_WASI, "ctypes": _NOT_IN_WASI, "mmap": _NOT_IN_WASI, "lzma": _NOT_IN_WASI, "bz2": _NOT_IN_WASI,
    "socket": "the sandbox refuses every connection: a function's output is the messages it returns",
    "subprocess": "WASI has no processes",
    "multiprocessing": "WASI has no processes",
}
# Written by componentize-py at build time, or built into every component.
_GENERATED = ("wit_world", "componentize_py_types", "componentize_py_runtime", "componentize_py_async_support",
              "poll_loop", "edgefn_guest", "edgefn_tensors")
_NATIVE_SUFFIXES = (".so", ".pyd", ".dylib")


@dataclass
class Checked:
    """What the check found that is not an error: the installed packages the component will bundle."""

    bundled: dict[str, Path] = field(default_factory=dict)


def check_sources(function_dir: Path) -> Checked:
    """Compile every .py of the function (not run it) and look at its imports; BuildError on the first
    problem, as `path:line: what`."""
    function_dir = Path(function_dir)
    checked = Checked()
    for path in sorted(function_dir.rglob("*.py")):
        if "build" in path.relative_to(function_dir).parts:
            continue
        for node in _run_at_import(_parse(path)):
            for name in _imported(node):
                _check_import(name, path, node.lineno, function_dir, checked)
    return checked


def _run_at_import(tree: ast.AST) -> list[ast.AST]:
    """The statements that run when the module is imported, which is when componentize-py bundles what
    they import: not the bodies of functions (an import there is tried only in the guest, per event)."""
    found: list[ast.AST] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        found.append(node)
        found += _run_at_import(node)
    return found


def _parse(path: Path) -> ast.Module:
    try:
        source = path.read_bytes()
        tree = ast.parse(source, filename=str(path))
        compile(tree, str(path), "exec")  # what the parser lets through and the compiler does not ('return' outside a def)
        return tree
    except SyntaxError as exc:
        where = f"{path}:{exc.lineno}" + (f":{exc.offset}" if exc.offset else "")
        text = (exc.text or "").rstrip("\n")
        shown = ""
        if text.strip():  # the line, and a caret under the offending column
            indent = len(text) - len(text.lstrip())
            shown = f"\n    {text.strip()}\n    {' ' * max(0, (exc.offset or 1) - 1 - indent)}^"
        raise BuildError(f"{where}: {exc.msg}{shown}") from None
    except (OSError, ValueError) as exc:  # unreadable, or a NUL byte in the source
        raise BuildError(f"{path}: cannot read it as Python: {exc}") from None


def _imported(node: ast.AST) -> list[str]:
    """The top-level names of the modules a statement imports (relative imports are the function's own)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def _check_import(name: str, path: Path, line: int, function_dir: Path, checked: Checked) -> None:
    where = f"{path}:{line}"
    if name in REFUSED:
        raise BuildError(f"{where}: import {name}: not available to a function ({REFUSED[name]})")
    if name in sys.stdlib_module_names or name in _GENERATED or name in checked.bundled:
        return
    if (function_dir / f"{name}.py").is_file() or (function_dir / name / "__init__.py").is_file() \
            or (function_dir / name).is_dir():
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise BuildError(f"{where}: import {name}: no such module in the function's folder, the standard "
                         f"library or {sys.executable}'s packages")
    native = _native_file(spec)
    if native is not None:
        raise BuildError(f"{where}: import {name}: a native extension ({native.name}, compiled for this machine, "
                         "not for WASI); a function can import the standard library and pure-Python packages only")
    locations = list(spec.submodule_search_locations or [])
    checked.bundled[name] = Path(locations[0]) if locations else Path(spec.origin or name)


def _native_file(spec: importlib.machinery.ModuleSpec) -> Path | None:
    """A compiled extension the module is, or that its package holds."""
    if spec.origin and spec.origin.endswith(_NATIVE_SUFFIXES):
        return Path(spec.origin)
    for folder in spec.submodule_search_locations or []:
        for path in Path(folder).rglob("*"):
            if path.suffix in _NATIVE_SUFFIXES or ".so." in path.name:
                return path
    return None
