"""Reading a bundle (`read_bundle`, `contents`), checking it (`verify_bundle`) and unpacking it safely
(`unpack`): plain files only, at safe paths, each as bundle.json's sha256 says; an unpacked folder is
whole (`.complete` written last) or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from edgefn.errors import BundleError, validation_text
from edgefn.files import file_sha256
from edgefn.fleet.bundle import BUNDLE_JSON, CHUNK, BundleManifest, safe_path

COMPLETE = ".complete"  # written last into an unpacked bundle: the folder is whole


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
        safe_path(member.name)
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
        while chunk := source.read(CHUNK):
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
