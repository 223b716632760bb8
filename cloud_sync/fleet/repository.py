"""The fleet server's TUF repository: it takes signed metadata and bundles from the operator only once they
verify against the root it trusts, and serves them the way python-tuf's ngclient fetches them.

    DIR/metadata/<v>.root.json, root.json      every root version, and the newest
    DIR/metadata/<v>.targets.json, <v>.snapshot.json, timestamp.json
    DIR/targets/<sha256>.<target>               the bundles (consistent snapshots: addressed by hash)

The server trusts the root the operator gives it at its first start (`--fleet-root`, kept in the data
folder from then on); a root is never taken from the network on trust (a first 1.root.json uploaded is
refused: whoever got there first would own the fleet). A newer root must be signed by the threshold of the one before it and of itself; targets,
snapshot and timestamp by the keys the root names. A version may not go backwards (an old file published
again is a replay), the same version may not change, a snapshot must match the targets it names and a
timestamp the snapshot it names, and a bundle the length and sha256 its targets entry signs. A publish is
checked whole before anything of it is stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from edgefn.errors import BundleError, ConfigError, PublishRefused
from edgefn.fleet.unpack import read_bundle

METADATA_NAME = re.compile(r"^(?:([1-9][0-9]{0,9})\.)?(root|targets|snapshot|timestamp)\.json$")
TARGET_NAME = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9][A-Za-z0-9._+-]{0,250}$")
ORDER = {"root": 0, "targets": 1, "snapshot": 2, "timestamp": 3}


@dataclass(frozen=True)
class PublishedBundle:
    name: str
    version: str
    target: str
    sha256: str
    size: int


@dataclass
class _Upload:
    """A publish being checked: the files it adds, over what is stored."""

    files: dict[str, bytes] = field(default_factory=dict)
    root: Metadata[Root] | None = None  # the root trusted for it, parsed once


def metadata_kind(name: str) -> tuple[str, int | None]:
    """'3.targets.json' -> ('targets', 3); 'timestamp.json' -> ('timestamp', None). PublishRefused otherwise."""
    m = METADATA_NAME.match(name)
    kind, number = (m.group(2), m.group(1)) if m else ("", None)
    if not m or (kind == "timestamp" and number) or (kind in ("targets", "snapshot") and not number):
        raise PublishRefused(f"{name!r} is not a TUF metadata file name (N.root.json, N.targets.json, "
                             "N.snapshot.json or timestamp.json)")
    return kind, int(number) if number else None


class TufRepository:
    """The served repository under `folder`; `publish` adds to it, `metadata_file`/`target_file` find files."""

    def __init__(self, folder: Path, *, trusted_root: Path | None = None):
        self.metadata_dir, self.targets_dir = folder / "metadata", folder / "targets"
        for path in (self.metadata_dir, self.targets_dir):
            path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        if trusted_root is not None:
            self._trust(trusted_root)

    def _trust(self, path: Path) -> None:
        try:
            data = path.read_bytes()
            root = Metadata[Root].from_bytes(data)
        except OSError as exc:
            raise ConfigError(f"--fleet-root {path}: cannot read it ({exc.strerror or exc})") from None
        except DeserializationError as exc:
            raise ConfigError(f"--fleet-root {path}: not TUF root metadata ({exc})") from None
        if root.signed.type != "root":
            raise ConfigError(f"--fleet-root {path}: holds {root.signed.type} metadata, not root")
        name = f"{root.signed.version}.root.json"
        stored = self.metadata_dir / name
        if stored.exists():
            if stored.read_bytes() != data:
                raise ConfigError(f"--fleet-root {path}: the data folder trusts another {name} already")
            return
        if self._root() is not None:
            raise ConfigError(f"--fleet-root {path}: the data folder trusts a root already, and not this one")
        try:
            root.verify_delegate("root", root)
        except UnsignedMetadataError as exc:
            raise ConfigError(f"--fleet-root {path}: not signed by its own keys ({exc})") from None
        self._write({name: data, "root.json": data})

    @property
    def trusts_a_root(self) -> bool:
        return (self.metadata_dir / "root.json").exists()

    # --- reading ------------------------------------------------------------------------------------

    def _root(self) -> Metadata[Root] | None:
        path = self.metadata_dir / "root.json"
        return Metadata[Root].from_file(str(path)) if path.exists() else None

    def _stored(self, name: str) -> bytes | None:
        try:
            return (self.metadata_dir / name).read_bytes()
        except FileNotFoundError:
            return None

    def _latest_version(self, kind: str) -> int:
        if kind == "timestamp":
            data = self._stored("timestamp.json")
            return Metadata.from_bytes(data).signed.version if data else 0
        versions = [metadata_kind(p.name)[1] for p in self.metadata_dir.glob(f"*.{kind}.json")]
        return max((v for v in versions if v is not None), default=0)

    def metadata_file(self, name: str) -> Path | None:
        """The stored metadata file of that name (None: no such file, or not a name it could have)."""
        if not METADATA_NAME.match(name):
            return None
        path = self.metadata_dir / name
        return path if path.is_file() else None

    def target_file(self, name: str) -> Path | None:
        if not TARGET_NAME.match(name) or ".." in name:
            return None
        path = self.targets_dir / name
        return path if path.is_file() else None

    # --- publishing ---------------------------------------------------------------------------------

    def publish(self, metadata: list[tuple[str, bytes]], bundle: IO[bytes] | None,
                record: Callable[[PublishedBundle], None] = lambda _: None, *,
                now: datetime | None = None) -> tuple[list[str], PublishedBundle | None]:
        """Check the uploaded metadata files (name, bytes) and bundle; store them when all verify. `record` is
        called with the bundle before it is stored (to add it to the database; raising there stores nothing).
        Returns the metadata names stored (those already stored byte for byte are left out) and the bundle."""
        now = now or datetime.now(timezone.utc)
        with self._lock, _folder_lock(self.metadata_dir.parent / ".publish.lock"), \
                tempfile.TemporaryDirectory(dir=self.targets_dir) as tmp:
            upload = _Upload()
            for name, data in sorted(metadata, key=lambda f: _order(f[0])):
                self._check(upload, name, data, now)
            published = self._take_bundle(upload, bundle, Path(tmp) / "bundle") if bundle is not None else None
            if published is not None:
                record(published)
            self._write(upload.files)
            if published is not None:
                os.replace(Path(tmp) / "bundle", self.targets_dir / f"{published.sha256}.{published.target}")
        return sorted((n for n in upload.files if n != "root.json"), key=_order), published

    def _check(self, upload: _Upload, name: str, data: bytes, now: datetime) -> None:
        kind, version = metadata_kind(name)
        try:
            md = Metadata.from_bytes(data)
        except DeserializationError as exc:
            raise PublishRefused(f"{name}: not TUF metadata ({exc})") from None
        if md.signed.type != kind:
            raise PublishRefused(f"{name} holds {md.signed.type} metadata")
        if version is not None and md.signed.version != version:
            raise PublishRefused(f"{name} holds version {md.signed.version}")
        if kind == "root" and version is None:
            raise PublishRefused("publish root metadata as N.root.json, not root.json")
        root = self._trusted(upload)
        if kind == "root":
            return self._check_root(upload, name, data, md, root)
        if root is None:
            raise PublishRefused(f"{name}: the server trusts no root: start it with --fleet-root (the operator's "
                                 "1.root.json from `edgefn fleet keys init`)")
        try:
            root.verify_delegate(kind, md)
        except UnsignedMetadataError as exc:
            raise PublishRefused(f"{name}: its signatures do not verify against root version "
                                 f"{root.signed.version} ({exc})") from None
        if md.signed.is_expired(now):
            raise PublishRefused(f"{name}: expired on {md.signed.expires:%Y-%m-%d %H:%M} UTC")
        stored_name = name if kind != "timestamp" else "timestamp.json"
        latest = max([self._latest_version(kind), *(Metadata.from_bytes(d).signed.version
                                                    for n, d in upload.files.items() if n.endswith(f"{kind}.json"))])
        if md.signed.version < latest:
            raise PublishRefused(f"{name}: version {md.signed.version} is older than version {latest}, published "
                                 "already (a replay of old metadata?)")
        if md.signed.version == latest:
            if self._get(upload, stored_name) == data:
                return  # sent again (a push that did not hear the answer): nothing new
            raise PublishRefused(f"{name}: version {latest} was published already with other contents "
                                 "(metadata versions only go up)")
        if kind == "snapshot":
            self._check_meta(upload, name, md.signed.meta.get("targets.json"), "targets")
        elif kind == "timestamp":
            self._check_meta(upload, name, md.signed.snapshot_meta, "snapshot")
        upload.files[stored_name] = data

    def _check_root(self, upload: _Upload, name: str, data: bytes, md: Metadata, root: Metadata[Root] | None) -> None:
        version = md.signed.version
        if root is None:
            raise PublishRefused(f"{name}: the server trusts no root, and takes none from the network: start it "
                                 "with --fleet-root (the operator's 1.root.json from `edgefn fleet keys init`)")
        if root is not None and version <= root.signed.version:
            if self._get(upload, name) == data:
                return
            raise PublishRefused(f"{name}: root version {version} is not newer than the trusted version "
                                 f"{root.signed.version} (a replay?)")
        if root is not None and version != root.signed.version + 1:
            raise PublishRefused(f"{name}: the trusted root is version {root.signed.version}; publish "
                                 f"{root.signed.version + 1}.root.json first")
        try:
            if root is not None:
                root.verify_delegate("root", md)  # the keys trusted now vouch for the new ones
            md.verify_delegate("root", md)
        except UnsignedMetadataError as exc:
            raise PublishRefused(f"{name}: not signed by the threshold of root keys ({exc})") from None
        upload.files[name] = upload.files["root.json"] = data
        upload.root = md

    def _check_meta(self, upload: _Upload, name: str, meta: object, kind: str) -> None:
        """A snapshot (or timestamp) must name a targets (or snapshot) version that exists, by its hash."""
        version = getattr(meta, "version", None)
        data = self._get(upload, f"{version}.{kind}.json") if version else None
        if data is None:
            raise PublishRefused(f"{name} names {kind} version {version}, which was not published")
        try:
            meta.verify_length_and_hashes(data)  # type: ignore[attr-defined]
        except LengthOrHashMismatchError as exc:
            raise PublishRefused(f"{name} does not match {version}.{kind}.json: {exc}") from None

    def _take_bundle(self, upload: _Upload, bundle: IO[bytes], dest: Path) -> PublishedBundle:
        digest, size = hashlib.sha256(), 0
        with open(dest, "wb") as out:
            while chunk := bundle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        sha256 = digest.hexdigest()
        try:
            manifest = read_bundle(dest)
        except BundleError as exc:  # its message names the file: a temporary path of this server, not said
            raise PublishRefused(f"the upload is not a bundle: {str(exc).replace(str(dest), 'the upload')}") from None
        version = self._latest_version("targets")
        version = max([version] + [int(n.split(".")[0]) for n in upload.files if n.endswith(".targets.json")])
        data = self._get(upload, f"{version}.targets.json")
        signed = Metadata.from_bytes(data).signed.targets.get(manifest.target) if data else None  # type: ignore[attr-defined]
        if signed is None:
            raise PublishRefused(f"{manifest.target} is not in the signed targets (version {version}): sign it "
                                 "with edgefn fleet push")
        if signed.length != size or signed.hashes.get("sha256") != sha256:
            raise PublishRefused(f"{manifest.target} does not match its signed targets entry: {size} bytes, sha256 "
                                 f"{sha256}; signed: {signed.length} bytes, sha256 {signed.hashes.get('sha256')}")
        return PublishedBundle(manifest.name, manifest.version, manifest.target, sha256, size)

    def _trusted(self, upload: _Upload) -> Metadata[Root] | None:
        if upload.root is None:  # none uploaded (yet): the stored one, read once a publish
            upload.root = self._root()
        return upload.root

    def _get(self, upload: _Upload, name: str) -> bytes | None:
        return upload.files.get(name) or self._stored(name)

    def _write(self, files: dict[str, bytes]) -> None:
        # timestamp.json last: a client that reads it finds everything it names already there.
        for name in sorted(files, key=_order):
            tmp = self.metadata_dir / f".{name}.tmp"
            tmp.write_bytes(files[name])
            os.replace(tmp, self.metadata_dir / name)


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the repository folder, for servers sharing it (one publish at a time)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _order(name: str) -> tuple[int, int]:
    m = METADATA_NAME.match(name)
    return (ORDER[m.group(2)], int(m.group(1) or 0)) if m else (9, 0)
