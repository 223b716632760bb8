"""Packing a bundle (`build_bundle`): the built functions, the variants of the models they use and the
health check, checked, into one reproducible tar (see `bundle` for the format).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgefn.errors import BundleError, ManifestError
from edgefn.files import file_sha256
from edgefn.fleet.bundle import BUNDLE_JSON, BUNDLE_NAME, HEALTH_JSON, BundleManifest, safe_path
from edgefn.fleet.health import load_health
from edgefn.functions import compile as compiler
from edgefn.functions.build import component_path, discover, why_build
from edgefn.functions.manifest import MANIFEST, Manifest, load_manifest
from edgefn.protocol.fleet import parse_version


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
        elif (why := why_build(folder, manifest)) is not None:
            problems.append(f"{manifest.name}: {wasm} is older than its sources: {why} "
                            f"(run `edgefn fn build {folder}`)")
    if problems:
        raise BundleError("; ".join(problems))
    return sorted(found, key=lambda f: f[1].name)


def _precompiled(folder: Path, manifest: Manifest, targets: Sequence[str]) -> dict[str, Path]:
    """The artifacts compiled for each of `targets` beside the built component (target -> file), each
    checked against its stamp: a device of that target maps it and compiles nothing."""
    wasm = component_path(folder, manifest)
    digest, found, problems = file_sha256(wasm), {}, []
    for target in targets:
        artifact = compiler.precompiled(wasm, target)
        problem = compiler.problem_with(artifact, digest, target) if artifact.exists() else "not compiled"
        if problem is None:
            found[target] = artifact
        else:
            problems.append(f"{manifest.name}: {artifact.name}: {problem} "
                            f"(run `edgefn fn build --target {target} {folder}`)")
    if problems:
        raise BundleError("; ".join(problems))
    return found


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
            rel = safe_path(str(variant["file"]))
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
                 variants: Sequence[str] | None = None, health: Path | None = None,
                 targets: Sequence[str] = ()) -> BundleInfo:
    """Pack the built functions under `dirs`, every variant (or those named) of the models they use, the
    components compiled for each of `targets` (`edgefn fn build --target`) and the health check into the
    reproducible tar `out`; BundleError says what is missing or wrong."""
    try:
        parse_version(version)
    except ValueError as exc:
        raise BundleError(f"--version: {exc}") from None
    if not BUNDLE_NAME.match(name):
        raise BundleError(f"--name {name!r}: use a-z, 0-9, '.', '_', '-', starting with a letter or digit")
    unknown_targets = [t for t in targets if t not in compiler.TARGETS]
    if unknown_targets:
        raise BundleError(f"--target: unknown {', '.join(unknown_targets)} (known: {', '.join(compiler.TARGETS)})")
    targets = sorted(set(targets))
    found = _functions(dirs)
    files: dict[str, Path | bytes] = {}
    for folder, manifest in found:
        files[f"functions/{manifest.name}/{MANIFEST}"] = folder / MANIFEST
        files[f"functions/{manifest.name}/{manifest.name}.wasm"] = component_path(folder, manifest)
        for artifact in _precompiled(folder, manifest, targets).values():
            files[f"functions/{manifest.name}/{artifact.name}"] = artifact
            files[f"functions/{manifest.name}/{compiler.stamp_of(artifact).name}"] = compiler.stamp_of(artifact)
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
        functions=[{"name": m.name, "version": m.version, "path": f"functions/{m.name}", "targets": targets}
                   for _, m in found],
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
