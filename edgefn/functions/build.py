"""Building functions: Python source -> WebAssembly component (componentize-py), and scaffolding.

`build/<name>.wasm` inside the function folder is the portable artifact a device receives; the
device compiles it for its own CPU once (see `sandbox.Runtime.load`), unless it is shipped compiled
for the device's target (`precompile_targets`: `build/<name>.<target>.cwasm`, carried by a bundle).
`build/<name>.sources.json` records the sha256 of everything the component was built from: a
component is stale when a source's content changed, not its file time (a fresh checkout, a copy or
an unpacked archive sets new times on unchanged sources).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgefn.errors import BuildError, ManifestError
from edgefn.files import file_sha256, write_atomic
from edgefn.functions import compile as compiler
from edgefn.functions.manifest import FUNCTION_NAME, MANIFEST, Manifest, load_manifest
from edgefn.functions.precheck import check_sources

WIT_DIR = Path(__file__).parent / "wit"
GUEST_DIR = Path(__file__).parent / "guest"  # edgefn_guest.py, importable by every function
WORLD = "function"
TEMPLATES = Path(__file__).parent / "templates"


def component_path(function_dir: Path, manifest: Manifest) -> Path:
    return Path(function_dir) / "build" / f"{manifest.name}.wasm"


def runnable_component(function_dir: Path, manifest: Manifest) -> Path:
    """The component to run: the one built here, or, in an unpacked fleet bundle, the one it ships
    beside the manifest (functions/<name>/<name>.wasm)."""
    built = component_path(function_dir, manifest)
    shipped = Path(function_dir) / f"{manifest.name}.wasm"
    return shipped if not built.exists() and shipped.exists() else built


def discover(paths: list[Path]) -> list[Path]:
    """Function folders: each path is one (it holds edgefn.toml) or holds several."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if (path / MANIFEST).is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.glob(f"*/{MANIFEST}")))
        else:
            raise ManifestError(f"{path}: no such function folder")
    if not found:
        raise ManifestError(f"no function (no {MANIFEST}) under {', '.join(map(str, paths))}")
    return found


def needs_build(function_dir: Path, manifest: Manifest) -> bool:
    """True when the component is missing or older than a source file or the WIT world."""
    return why_build(function_dir, manifest) is not None


def watched_sources(function_dir: Path) -> list[Path]:
    """What a component is built from: the function's Python files and manifest, the WIT world, edgefn_guest."""
    return [*(p for p in Path(function_dir).rglob("*.py") if "build" not in p.parts), Path(function_dir) / MANIFEST,
            *WIT_DIR.glob("*.wit"), *GUEST_DIR.glob("*.py")]


def sources_stamp(function_dir: Path, manifest: Manifest) -> Path:
    return Path(function_dir) / "build" / f"{manifest.name}.sources.json"


def _sources_now(function_dir: Path, manifest: Manifest) -> dict[str, object]:
    """What a component is built from, by content: each source's sha256 under a stable name, and the
    manifest's module (its version and limits do not change the component)."""
    function_dir = Path(function_dir)
    files: dict[str, str] = {}
    for path in watched_sources(function_dir):
        if path.name == MANIFEST and path.parent == function_dir:
            continue
        if path.is_relative_to(function_dir):
            name = str(path.relative_to(function_dir))
        else:
            name = f"{'wit' if path.parent == WIT_DIR else 'guest'}/{path.name}"
        files[name] = file_sha256(path)
    return {"module": manifest.function.module, "sources": dict(sorted(files.items()))}


def why_build(function_dir: Path, manifest: Manifest) -> str | None:
    """Why the component must be built again ("no component yet", "app.py changed"); None: it is fresh."""
    wasm = component_path(function_dir, manifest)
    if not wasm.exists():
        return "no component yet"
    try:
        recorded = json.loads(sources_stamp(function_dir, manifest).read_text())
    except (OSError, ValueError):
        return _why_by_time(function_dir, wasm)  # built before sources were recorded
    now = _sources_now(function_dir, manifest)
    if recorded.get("module") != now["module"]:
        return f"{MANIFEST}'s function.module changed"
    before, after = recorded.get("sources", {}), now["sources"]
    assert isinstance(after, dict)
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    if not changed:
        return None
    return f"{changed[0]} changed" + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")


def _why_by_time(function_dir: Path, wasm: Path) -> str | None:
    built = wasm.stat().st_mtime
    changed = [p for p in watched_sources(function_dir) if p.stat().st_mtime > built]
    if not changed:
        return None
    first = changed[0]
    name = first.relative_to(function_dir) if first.is_relative_to(function_dir) else first.name
    return f"{name} changed" + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")


def precompile_targets(wasm: Path, targets: list[str]) -> dict[str, str]:
    """Compile `wasm` for each target beside it (build/<name>.<target>.cwasm, each in a child process);
    target -> "compiled" or "up to date". BuildError names a target this wasmtime cannot compile for."""
    digest, done = file_sha256(wasm), {}
    for target in targets:
        artifact = compiler.precompiled(wasm, target)
        if artifact.exists() and compiler.problem_with(artifact, digest, target) is None:
            done[target] = "up to date"
            continue
        compiler.compile_in_child(wasm, artifact, target)
        done[target] = "compiled"
    return done


def _remove_precompiled(wasm: Path) -> None:
    """Artifacts of the component being replaced: compiled from other bytes, they must not be shipped."""
    for old in wasm.parent.glob(f"{wasm.stem}.*.cwasm*"):
        old.unlink(missing_ok=True)


def build(function_dir: Path, notes: list[str] | None = None) -> Path:
    """Compile a Python function to `build/<name>.wasm`; BuildError carries componentize-py's message.

    The sources are checked on the host first (`precheck`: a syntax error or an import that cannot work
    is said in a moment, at its file and line); `notes` receives what is worth knowing and not an error
    (the installed packages bundled into the component)."""
    function_dir = Path(function_dir).resolve()
    manifest = load_manifest(function_dir)
    if importlib.util.find_spec("componentize_py") is None:
        raise BuildError(f"{manifest.name}: building a function needs componentize-py, which is not installed "
                         "here: pip install 'edgefn[build]' (a device runs built components and needs none)")
    if not (function_dir / f"{manifest.function.module}.py").is_file():
        raise BuildError(f"{function_dir}: no {manifest.function.module}.py (the manifest's function.module)")
    checked = check_sources(function_dir)
    if notes is not None:
        notes += [f"bundling {name} from {where} (a pure-Python package installed here)"
                  for name, where in checked.bundled.items()]
    out = component_path(function_dir, manifest)
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".wasm.tmp")
    built_from = _sources_now(function_dir, manifest)  # before: a save during the build makes it stale
    with _sources(function_dir) as sources:
        cmd = [sys.executable, "-c", "import sys, componentize_py; sys.argv[0] = 'componentize-py'; "
               "componentize_py.script()", "-d", str(WIT_DIR), "-w", WORLD, "componentize", "-p", str(sources),
               "-p", str(GUEST_DIR), manifest.function.module, "-o", str(tmp)]
        proc = subprocess.run(cmd, cwd=sources, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{manifest.name}: componentize-py failed:\n{_readable(proc.stderr or proc.stdout, function_dir)}")
    _remove_precompiled(out)
    tmp.replace(out)
    write_atomic(sources_stamp(function_dir, manifest), (json.dumps(built_from, indent=2) + "\n").encode())
    return out


def _readable(detail: str, function_dir: Path) -> str:
    """componentize-py's message with the function's real paths (it names its sources /0/...) and
    without the Rust runtime's panic notes."""
    lines = [line for line in detail.strip().splitlines()
             if "RUST_BACKTRACE" not in line and not line.startswith("thread '")]
    return "\n".join(lines).replace('"/0/', f'"{function_dir}/')


@contextlib.contextmanager
def _sources(function_dir: Path) -> Iterator[Path]:
    """The folder componentize-py reads: the function's own, or, where a source file is a symbolic link
    (two functions sharing code), a copy with the links followed, which its sandbox cannot do."""
    if not any(p.is_symlink() for p in function_dir.rglob("*.py")):
        yield function_dir
        return
    with tempfile.TemporaryDirectory(prefix="edgefn-build-") as tmp:
        copy = Path(tmp) / function_dir.name
        shutil.copytree(function_dir, copy, symlinks=False, ignore=shutil.ignore_patterns("build", "__pycache__"))
        yield copy


def scaffold(name: str, parent: Path) -> Path:
    """Create `<parent>/<name>/` with a manifest, a handler and a sample event."""
    if not FUNCTION_NAME.match(name):  # before touching the disk: "a/b" or "../x" would make folders
        raise BuildError(f"{name!r} is not a valid function name (use a-z, 0-9, '-', '_')")
    target = Path(parent) / name
    if target.exists():
        raise BuildError(f"{target} already exists")
    target.mkdir(parents=True)
    for template in sorted(TEMPLATES.iterdir()):
        if template.is_file():
            text = template.read_text().replace("{{name}}", name)
            (target / template.name.removesuffix(".tmpl")).write_text(text)
    try:
        load_manifest(target)
    except ManifestError:
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
        raise BuildError(f"{name!r} is not a valid function name (use a-z, 0-9, '-', '_')") from None
    return target
