"""Bundles: a release of functions, their models and a health check, packed in one reproducible tar.

    bundle.json                      BundleManifest: name, version, functions, models, health, files (sha256)
    functions/<name>/edgefn.toml     the manifest
    functions/<name>/<name>.wasm     the built component
    models/<model>/model.json        only the variants shipped
    models/<model>/<variant files>
    health.json                      HealthCheck (optional)

The tar is uncompressed, its entries sorted, with mtime 0 and uid/gid 0: the same input gives the
same bytes, so a bundle is named by its sha256. A device unpacks it (`unpack`) into a folder it never
changes once complete, and runs its health check (`check_health`) through the new functions before
it trusts them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgefn.errors import BundleError, ManifestError, validation_text
from edgefn.functions.build import component_path, discover, needs_build
from edgefn.functions.manifest import MANIFEST, Manifest, load_manifest
from edgefn.protocol.fleet import parse_version, target_name
from edgefn.topics import is_errors_topic

BUNDLE_JSON = "bundle.json"
HEALTH_JSON = "health.json"
COMPLETE = ".complete"  # written last into an unpacked bundle: the folder is whole
BUNDLE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_CHUNK = 1 << 20

# run(topic, payload) -> [(topic, payload), ...]: one event through the functions under test.
RunEvent = Callable[[str, bytes], Sequence[tuple[str, bytes]]]


def _safe_path(path: str) -> str:
    """A relative POSIX path inside the bundle: no absolute path, no '..', no empty or odd part."""
    pure = PurePosixPath(path)
    if (not path or "\\" in path or pure.is_absolute() or str(pure) != path
            or any(part in ("", ".", "..") for part in pure.parts)):
        raise ValueError(f"{path!r} is not a safe relative path")
    return path


# --- bundle.json ----------------------------------------------------------------------------------


class BundleFunction(BaseModel):
    """One function of a bundle: its manifest and component lie under `path`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The function's name (its manifest's function.name).")
    version: str = Field(description="The function's own version (its manifest's function.version).")
    path: str = Field(description="Its folder in the bundle: functions/<name>.")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _safe_path(value)

    def folder(self, root: Path) -> Path:
        """Its folder (with edgefn.toml) in a bundle unpacked at `root`."""
        return Path(root) / self.path

    def component(self, root: Path) -> Path:
        """Its built component in a bundle unpacked at `root`."""
        return Path(root) / self.path / f"{self.name}.wasm"


class BundleManifest(BaseModel):
    """bundle.json: what a bundle holds, and the sha256 of every other file in it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The bundle's name: a-z, 0-9, '.', '_', '-'.")
    version: str = Field(description="PEP 440 version, ordered: a device refuses one older than it runs.")
    functions: list[BundleFunction] = Field(description="The functions, sorted by name.")
    models: list[str] = Field(default_factory=list, description="The models shipped under models/<name>/.")
    health: str | None = Field(default=None, description="The health check's file in the bundle, if any.")
    files: dict[str, str] = Field(description="Every file but bundle.json: path -> sha256 (hex).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not BUNDLE_NAME.match(value):
            raise ValueError(f"{value!r}: a bundle name holds a-z, 0-9, '.', '_', '-' and starts with a letter "
                             "or digit")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        parse_version(value)
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value: dict[str, str]) -> dict[str, str]:
        for path, digest in value.items():
            _safe_path(path)
            if path == BUNDLE_JSON or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{path!r}: expected a file path and its sha256 (64 hex digits)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> BundleManifest:
        needed = [f"{fn.path}/{MANIFEST}" for fn in self.functions]
        needed += [f"{fn.path}/{fn.name}.wasm" for fn in self.functions]
        needed += [f"models/{m}/model.json" for m in self.models]
        needed += [self.health] if self.health else []
        missing = [p for p in needed if p not in self.files]
        if missing:
            raise ValueError(f"files does not list {', '.join(missing)}")
        return self

    @property
    def target(self) -> str:
        """Its name among the TUF repository's targets."""
        return target_name(self.name, self.version)


# --- health.json ----------------------------------------------------------------------------------


class Expect(BaseModel):
    """One output a sample must produce: this topic, these JSON values, numbers within these bounds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    topic: str = Field(description="The output's topic, exactly.")
    json_subset: dict[str, Any] = Field(default_factory=dict, alias="json",
                                        description="Keys the output's JSON object must hold, with these values.")
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict,
                                                   description="Keys whose value must be a number in [lo, hi].")

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for key, (lo, hi) in value.items():
            if lo > hi:
                raise ValueError(f"bounds {key!r}: [{lo}, {hi}] is empty (lo > hi)")
        return value

    def mismatch(self, topic: str, payload: bytes) -> str | None:
        """Why the output (topic, payload) is not this one; None when it is."""
        if topic != self.topic:
            return f"topic {topic}"
        if not self.json_subset and not self.bounds:
            return None
        try:
            doc = json.loads(payload)
        except ValueError:
            return "payload is not JSON"
        if not isinstance(doc, dict):
            return "payload is not a JSON object"
        for key, want in self.json_subset.items():
            if key not in doc:
                return f"no {key!r}"
            if doc[key] != want:
                return f"{key}={json.dumps(doc[key])}, want {json.dumps(want)}"
        for key, (lo, hi) in self.bounds.items():
            value = doc.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{key}={json.dumps(value)} is not a number"
            if not lo <= value <= hi:
                return f"{key}={value:g} outside [{lo:g}, {hi:g}]"
        return None

    def describe(self) -> str:
        parts = [self.topic]
        parts += [f"{k}={json.dumps(v)}" for k, v in self.json_subset.items()]
        parts += [f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in self.bounds.items()]
        return " ".join(parts)


class Sample(BaseModel):
    """One event of the health check and the outputs it must produce."""

    model_config = ConfigDict(extra="forbid")

    topic: str = Field(description="The topic the event arrives on.")
    payload: Any = Field(default=None, description="The payload as JSON (sent as UTF-8 JSON text).")
    payload_b64: str | None = Field(default=None, description="The payload as bytes, base64 (instead of payload).")
    expect: list[Expect] = Field(default_factory=list, description="Outputs that must be among the event's.")

    @model_validator(mode="after")
    def _one_payload(self) -> Sample:
        if (self.payload is None) == (self.payload_b64 is None):
            raise ValueError("give exactly one of payload (JSON) and payload_b64 (bytes)")
        if self.payload_b64 is not None:
            try:
                base64.b64decode(self.payload_b64, validate=True)
            except ValueError:
                raise ValueError("payload_b64 is not base64") from None
        return self

    def payload_bytes(self) -> bytes:
        if self.payload_b64 is not None:
            return base64.b64decode(self.payload_b64)
        return json.dumps(self.payload, separators=(",", ":")).encode()


class HealthCheck(BaseModel):
    """health.json: sample events the new functions must answer as expected before a device trusts them."""

    model_config = ConfigDict(extra="forbid")

    samples: list[Sample] = Field(min_length=1, description="The sample events, run in order.")


def load_health(path: Path) -> HealthCheck:
    """Read and validate a health.json; BundleError names the file and what is wrong."""
    try:
        return HealthCheck.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the health check: {exc.strerror or exc}") from None
    except ValidationError as exc:
        raise BundleError(f"{path}: {validation_text(exc)}") from None


def _assign(candidates: list[list[int]]) -> list[int | None]:
    """For each expectation, a distinct output among its candidates (bipartite matching); None where none is left."""
    owner: dict[int, int] = {}

    def place(i: int, seen: set[int]) -> bool:
        for out in candidates[i]:
            if out not in seen:
                seen.add(out)
                if out not in owner or place(owner[out], seen):
                    owner[out] = i
                    return True
        return False

    for i in range(len(candidates)):
        place(i, set())
    chosen: list[int | None] = [None] * len(candidates)
    for out, i in owner.items():
        chosen[i] = out
    return chosen


def _show(topic: str, payload: bytes) -> str:
    text = payload.decode("utf-8", "replace")
    return f"{topic} {text[:200]}{'...' if len(text) > 200 else ''}"


def check_health(samples: Iterable[Sample], run: RunEvent) -> list[str]:
    """Run every sample through `run` and say what went wrong, one line a problem (empty: healthy).

    Each expectation must match its own output (same topic, `json` a subset of the output's JSON,
    `bounds` numbers within range); no output may be an error (topic edgefn/errors/...); an exception
    from `run` fails its sample."""
    failures: list[str] = []
    for n, sample in enumerate(samples, 1):
        where = f"sample {n} ({sample.topic})"
        try:
            outputs = [(str(t), bytes(p)) for t, p in run(sample.topic, sample.payload_bytes())]
        except Exception as exc:  # noqa: BLE001 - whatever the new functions raise fails the check
            failures.append(f"{where}: {type(exc).__name__}: {exc}")
            continue
        failures += [f"{where}: error output {_show(t, p)}" for t, p in outputs if is_errors_topic(t)]
        candidates = [[i for i, (t, p) in enumerate(outputs) if e.mismatch(t, p) is None] for e in sample.expect]
        for expect, chosen in zip(sample.expect, _assign(candidates), strict=True):
            if chosen is not None:
                continue
            reasons = [f"{_show(t, p)} ({e})" for t, p in outputs if (e := expect.mismatch(t, p))]
            seen = "; ".join(reasons) if reasons else "no output" if not outputs else "its match went to another"
            failures.append(f"{where}: expected {expect.describe()}; got {seen}")
    return failures


# --- building -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleInfo:
    """A bundle as written: its file, sha256, size, bundle.json and table of contents (path, size)."""

    path: Path
    sha256: str
    size: int
    manifest: BundleManifest
    entries: list[tuple[str, int]] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.manifest.target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _functions(dirs: Sequence[Path]) -> list[tuple[Path, Manifest]]:
    try:
        found = [(d, load_manifest(d)) for d in discover(list(dirs))]
    except ManifestError as exc:
        raise BundleError(str(exc)) from None
    names = [m.name for _, m in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BundleError(f"function {', '.join(twice)} given twice (a bundle holds one function of a name)")
    problems = []
    for folder, manifest in found:
        wasm = component_path(folder, manifest)
        if not wasm.is_file():
            problems.append(f"{manifest.name}: no built component {wasm} (run `edgefn fn build {folder}` first)")
        elif needs_build(folder, manifest):
            problems.append(f"{manifest.name}: {wasm} is older than its sources (run `edgefn fn build {folder}`)")
    if problems:
        raise BundleError("; ".join(problems))
    return sorted(found, key=lambda f: f[1].name)


def _model_files(name: str, models: Sequence[Path], variants: Sequence[str] | None
                 ) -> tuple[dict[str, Path | bytes], list[str]]:
    """models/<name>/...: its model.json narrowed to the shipped variants and their files (checked); the
    names of the variants shipped."""
    folder = next((Path(m) / name for m in models if (Path(m) / name / "model.json").is_file()), None)
    if folder is None:
        raise BundleError(f"model {name}: no {name}/model.json under {', '.join(map(str, models))} (--models)")
    try:
        meta = json.loads((folder / "model.json").read_text())
        listed = list(meta["variants"])
        names = [v["name"] for v in listed]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{folder / 'model.json'}: unreadable model metadata: {exc!r}") from None
    shipped = [v for v in listed if variants is None or v["name"] in variants]
    if not shipped:
        raise BundleError(f"model {name} has none of the variants {', '.join(variants or [])} "
                          f"(it has: {', '.join(names)})")
    files: dict[str, Path | bytes] = {}
    for variant in shipped:
        try:
            rel = _safe_path(str(variant["file"]))
        except (KeyError, ValueError) as exc:
            raise BundleError(f"{folder / 'model.json'}: variant {variant['name']}: bad file: {exc}") from None
        path = folder / rel
        if not path.is_file():
            raise BundleError(f"model {name}: variant {variant['name']}: {path} is missing")
        recorded = variant.get("sha256")
        if recorded and file_sha256(path) != recorded:
            raise BundleError(f"model {name}: variant {variant['name']}: {path} does not match the sha256 "
                              "model.json records (changed since it was registered?)")
        files[f"models/{name}/{rel}"] = path
    meta["variants"] = shipped
    files[f"models/{name}/model.json"] = (json.dumps(meta, indent=2) + "\n").encode()
    return files, [v["name"] for v in shipped]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_bundle(dirs: Sequence[Path], name: str, version: str, out: Path, models: Sequence[Path] = (Path("models"),),
                 variants: Sequence[str] | None = None, health: Path | None = None) -> BundleInfo:
    """Pack the built functions under `dirs`, every variant (or those named) of the models they use and
    the health check into the reproducible tar `out`; BundleError says what is missing or wrong."""
    try:
        parse_version(version)
    except ValueError as exc:
        raise BundleError(f"--version: {exc}") from None
    if not BUNDLE_NAME.match(name):
        raise BundleError(f"--name {name!r}: use a-z, 0-9, '.', '_', '-', starting with a letter or digit")
    found = _functions(dirs)
    files: dict[str, Path | bytes] = {}
    for folder, manifest in found:
        files[f"functions/{manifest.name}/{MANIFEST}"] = folder / MANIFEST
        files[f"functions/{manifest.name}/{manifest.name}.wasm"] = component_path(folder, manifest)
    model_names = sorted({m for _, manifest in found for m in manifest.models.use})
    wanted = list(variants) if variants else None
    shipped: set[str] = set()
    for model in model_names:
        model_files, names = _model_files(model, models, wanted)
        files.update(model_files)
        shipped.update(names)
    unknown = [v for v in wanted or [] if v not in shipped]
    if unknown:
        raise BundleError(f"--variants: no model of these functions has {', '.join(unknown)}")
    if health is not None:
        load_health(health)
        files[HEALTH_JSON] = Path(health)

    blobs = {p: c if isinstance(c, bytes) else _read(c) for p, c in files.items()}
    manifest = BundleManifest(
        name=name, version=version,
        functions=[{"name": m.name, "version": m.version, "path": f"functions/{m.name}"} for _, m in found],
        models=model_names, health=HEALTH_JSON if health is not None else None,
        files={p: hashlib.sha256(b).hexdigest() for p, b in sorted(blobs.items())})
    blobs[BUNDLE_JSON] = (manifest.model_dump_json(indent=2) + "\n").encode()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(blobs):
                tar.addfile(_tarinfo(path, len(blobs[path])), io.BytesIO(blobs[path]))
        raw.flush()
        os.fsync(raw.fileno())
    tmp.replace(out)
    return BundleInfo(out, file_sha256(out), out.stat().st_size, manifest,
                      [(p, len(blobs[p])) for p in sorted(blobs)])


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror or exc}") from None


# --- reading and unpacking ------------------------------------------------------------------------


def _open(tar_path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tar_path, mode="r:")
    except FileNotFoundError:
        raise BundleError(f"{tar_path}: no such bundle") from None
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{tar_path}: not a bundle (not an uncompressed tar: {exc})") from None


def _parse_manifest(tar_path: Path, data: bytes) -> BundleManifest:
    try:
        return BundleManifest.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(f"{tar_path}: bad {BUNDLE_JSON}: {validation_text(exc)}") from None


def _manifest_of(tar_path: Path, tar: tarfile.TarFile) -> BundleManifest:
    try:
        member = tar.getmember(BUNDLE_JSON)
    except KeyError:
        raise BundleError(f"{tar_path}: no {BUNDLE_JSON} (not a bundle)") from None
    stream = tar.extractfile(member) if member.isfile() else None
    if stream is None:
        raise BundleError(f"{tar_path}: {BUNDLE_JSON} is not a plain file")
    return _parse_manifest(tar_path, stream.read())


def read_bundle(tar_path: Path) -> BundleManifest:
    """A bundle's bundle.json, validated (the files are not checked: `unpack` does that)."""
    with _open(tar_path) as tar:
        return _manifest_of(tar_path, tar)


def read_manifest(tar_path: Path) -> dict[str, Any]:
    """A bundle's bundle.json as a dict (validated)."""
    return read_bundle(tar_path).model_dump(mode="json")


def contents(tar_path: Path) -> list[tuple[str, int]]:
    """The bundle's table of contents: (path, size), in the tar's order."""
    with _open(tar_path) as tar:
        return [(m.name, m.size) for m in tar.getmembers()]


def _check_member(tar_path: Path, member: tarfile.TarInfo, dest: Path) -> None:
    """Only plain files at safe relative paths: no link, device, fifo, absolute path or '..'."""
    if not member.isfile():
        kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk()
                else "a device" if member.isdev() else "a folder" if member.isdir() else "not a plain file")
        raise BundleError(f"{tar_path}: {member.name!r} is {kind}; a bundle holds plain files only")
    try:
        _safe_path(member.name)
    except ValueError as exc:
        raise BundleError(f"{tar_path}: refused: {exc}") from None
    if hasattr(tarfile, "data_filter"):  # Python's own check as well (3.10.12+, 3.11.4+)
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as exc:
            raise BundleError(f"{tar_path}: refused: {exc}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(dest: Path) -> bool:
    return (Path(dest) / COMPLETE).is_file()


def read_unpacked(dest: Path) -> BundleManifest:
    """bundle.json of a bundle unpacked at `dest` (its files were checked against it when unpacked)."""
    return _parse_manifest(Path(dest), (Path(dest) / BUNDLE_JSON).read_bytes())


def unpack(tar_path: Path, dest: Path) -> BundleManifest:
    """Unpack a bundle into `dest`, checking every file against bundle.json's sha256.

    Plain files only, at safe paths; a file missing, extra or changed refuses the bundle. The files
    go to `<dest>.tmp` and `.complete` is written last, then the folder is renamed to `dest`: `dest`
    is either absent or whole. A `dest` already complete is left as it is."""
    tar_path, dest = Path(tar_path), Path(dest)
    if is_complete(dest):
        return _parse_manifest(tar_path, (dest / BUNDLE_JSON).read_bytes())
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _extract(tar_path, tmp)
        with open(tmp / COMPLETE, "wb") as f:
            f.write(f"{file_sha256(tar_path)}\n".encode())
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if dest.exists():  # an earlier, incomplete attempt
            shutil.rmtree(dest)
        tmp.rename(dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _copy(source: IO[bytes], target: Path | None) -> str:
    """Stream `source` to `target` (None: nowhere), fsynced; its sha256 (hex)."""
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        out = None
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(open(target, "wb"))
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    return digest.hexdigest()


def verify_bundle(tar_path: Path) -> BundleManifest:
    """Check a bundle without unpacking it: plain files at safe paths, each as bundle.json's sha256 says."""
    return _extract(Path(tar_path), None)


def _extract(tar_path: Path, into: Path | None) -> BundleManifest:
    """Read every member, checked; write it under `into` (None: only check)."""
    with _open(tar_path) as tar:
        manifest = _manifest_of(tar_path, tar)
        seen: set[str] = set()
        for member in tar:
            _check_member(tar_path, member, into or Path(tempfile.gettempdir()) / "bundle")
            if member.name in seen:
                raise BundleError(f"{tar_path}: {member.name!r} appears twice")
            seen.add(member.name)
            expected = manifest.files.get(member.name)
            if member.name != BUNDLE_JSON and expected is None:
                raise BundleError(f"{tar_path}: {member.name!r} is not listed in {BUNDLE_JSON}")
            source = tar.extractfile(member)
            assert source is not None  # a plain file, checked above
            digest = _copy(source, into / member.name if into is not None else None)
            if expected is not None and digest != expected:
                raise BundleError(f"{tar_path}: {member.name} does not match its sha256 in {BUNDLE_JSON} "
                                  "(tampered or corrupted)")
        missing = sorted(set(manifest.files) - seen)
        if missing:
            raise BundleError(f"{tar_path}: {BUNDLE_JSON} lists {', '.join(missing)}, not in the bundle")
    return manifest
