"""The operator's TUF repository: the keys that sign releases and the metadata devices verify them by.

    DIR/keys/<role>.pem                   Ed25519 private keys (PKCS#8 PEM, 0600): root, targets, snapshot, timestamp
    DIR/repository/metadata/1.root.json   the root of trust (given to devices once), also as root.json
    DIR/repository/metadata/<v>.targets.json, <v>.snapshot.json, timestamp.json
    DIR/repository/targets/<sha256>.<name>-<version>.bundle.tar
    DIR/operator.token                    the operator's bearer token for the fleet server (0600)

Consistent snapshots are on: every version of targets and snapshot stays under its own name, so a
device always reads one coherent set. Each release bumps and signs targets, snapshot and timestamp;
`refresh_timestamp` re-signs the timestamp alone, before it expires (a device refuses an expired one).
Written with python-tuf's Metadata API (`tuf.api.metadata`) and securesystemslib's CryptoSigner.
"""

from __future__ import annotations

import os
import secrets
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edgefn.errors import FleetError
from edgefn.files import write_atomic
from edgefn.fleet.unpack import read_bundle

ROLES = ("root", "targets", "snapshot", "timestamp")
ROOT_DAYS = 365.0
TARGETS_DAYS = 90.0  # targets and snapshot
TIMESTAMP_DAYS = 7.0
_HASHES = ["sha256"]
_PRETTY = JSONSerializer(compact=False)


def keys_dir(repo_dir: Path) -> Path:
    return Path(repo_dir) / "keys"


def metadata_dir(repo_dir: Path) -> Path:
    return Path(repo_dir) / "repository" / "metadata"


def targets_dir(repo_dir: Path) -> Path:
    return Path(repo_dir) / "repository" / "targets"


def root_file(repo_dir: Path) -> Path:
    """The first root: what a device is given once (`--fleet-root`)."""
    return metadata_dir(repo_dir) / "1.root.json"


def _expiry(days: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=days)


def _write_key(path: Path, signer: CryptoSigner) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)


def init_keys(repo_dir: Path, *, force: bool = False, expires_days: float = ROOT_DAYS) -> Path:
    """Make an Ed25519 key per role and the first root (consistent snapshots on); returns 1.root.json.

    A folder that already has keys is refused unless `force`, which replaces the keys and the whole
    repository: devices that trust the old root then refuse every new release."""
    repo_dir = Path(repo_dir)
    keys = keys_dir(repo_dir)
    if keys.exists() and any(keys.iterdir()) and not force:
        raise FleetError(f"{keys} already holds keys (--force replaces them, and devices given the old root "
                         "will refuse every release signed by the new ones)")
    if force:
        shutil.rmtree(keys, ignore_errors=True)
        shutil.rmtree(repo_dir / "repository", ignore_errors=True)
    keys.mkdir(parents=True, exist_ok=True)
    os.chmod(keys, 0o700)
    root = Metadata(Root(expires=_expiry(expires_days), consistent_snapshot=True))
    signers = {}
    for role in ROLES:
        signers[role] = CryptoSigner.generate_ed25519()
        root.signed.add_key(signers[role].public_key, role)
        _write_key(keys / f"{role}.pem", signers[role])
    root.sign(signers["root"])
    data = root.to_bytes(_PRETTY)
    write_atomic(root_file(repo_dir), data)
    write_atomic(metadata_dir(repo_dir) / "root.json", data)
    targets_dir(repo_dir).mkdir(parents=True, exist_ok=True)
    return root_file(repo_dir)


def operator_token_file(repo_dir: Path) -> Path:
    """The operator's bearer token: the fleet server's --token-file, and what the operator's commands send."""
    return Path(repo_dir) / "operator.token"


def init_operator_token(repo_dir: Path, *, force: bool = False) -> Path:
    """A new random operator token in DIR/operator.token (0600); an existing one is kept unless `force`."""
    path = operator_token_file(repo_dir)
    if force or not path.exists():
        write_atomic(path, (secrets.token_urlsafe(32) + "\n").encode())  # mkstemp's 0600 stays
    return path


class Repository:
    """The operator's repository on disk: its trusted root, the latest metadata and the signing keys."""

    def __init__(self, repo_dir: Path):
        self.dir = Path(repo_dir)
        self.metadata = metadata_dir(self.dir)
        self.root: Metadata[Root] = self._load(self.metadata / "root.json", Root)

    def _load(self, path: Path, kind: type) -> Metadata:
        try:
            md = Metadata.from_file(str(path))
        except FileNotFoundError:
            if kind is Root:
                raise FleetError(f"{self.dir}: no TUF repository here (run `edgefn fleet keys init {self.dir}`)") from None
            raise FleetError(f"{path}: missing (the repository is incomplete)") from None
        except (OSError, DeserializationError) as exc:
            raise FleetError(f"{path}: unreadable TUF metadata: {exc}") from None
        if not isinstance(md.signed, kind):
            raise FleetError(f"{path}: holds {md.signed.type} metadata, not {kind.type}")
        return md

    def signer(self, role: str) -> CryptoSigner:
        """The role's key from keys/<role>.pem, checked against the root: a foreign key is refused."""
        path = keys_dir(self.dir) / f"{role}.pem"
        try:
            private = load_pem_private_key(path.read_bytes(), None)
        except FileNotFoundError:
            raise FleetError(f"{path}: no {role} key") from None
        except (OSError, ValueError, TypeError) as exc:
            raise FleetError(f"{path}: not a usable private key: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise FleetError(f"{path}: not an Ed25519 key")
        signer = CryptoSigner(private)
        if signer.public_key.keyid not in self.root.signed.roles[role].keyids:
            raise FleetError(f"{path}: not the {role} key of this repository's root")
        return signer

    def latest(self) -> tuple[Metadata[Targets], Metadata[Snapshot], Metadata[Timestamp]] | None:
        """The current targets, snapshot and timestamp, followed from timestamp.json; None before the first release."""
        path = self.metadata / "timestamp.json"
        if not path.exists():
            return None
        timestamp = self._load(path, Timestamp)
        snapshot = self._load(self.metadata / f"{timestamp.signed.snapshot_meta.version}.snapshot.json", Snapshot)
        targets_version = snapshot.signed.meta["targets.json"].version
        targets = self._load(self.metadata / f"{targets_version}.targets.json", Targets)
        return targets, snapshot, timestamp

    def write(self, md: Metadata, name: str) -> tuple[Path, bytes]:
        """Sign `md` with its role's key and write it as `name`; its path and bytes."""
        md.sign(self.signer(md.signed.type))
        data = md.to_bytes(_PRETTY)
        path = self.metadata / name
        write_atomic(path, data)
        return path, data

    def write_timestamp(self, timestamp: Metadata[Timestamp], expires_days: float, *, bump: bool = True) -> Path:
        timestamp.signed.version += bump
        timestamp.signed.expires = _expiry(expires_days)
        path, _ = self.write(timestamp, "timestamp.json")
        return path


def add_release(repo_dir: Path, bundle_path: Path, *, expires_days: float = TIMESTAMP_DAYS,
                targets_days: float = TARGETS_DAYS) -> list[Path]:
    """Add a bundle as a target (`<name>-<version>.bundle.tar`), bump and sign targets, snapshot and
    timestamp, and copy the bundle to repository/targets/<sha256>.<target>.

    Returns the metadata files to publish, in the order to apply them: 1.root.json first on the
    first release, then `<v>.targets.json`, `<v>.snapshot.json`, `timestamp.json`. A version already
    released with other bytes is refused (a release never changes; bump the version).
    `expires_days` is the timestamp's lifetime, `targets_days` that of targets and snapshot."""
    repo = Repository(repo_dir)
    bundle = read_bundle(bundle_path)
    target = TargetFile.from_file(bundle.target, str(bundle_path), _HASHES)
    latest = repo.latest()
    if latest is None:
        targets, snapshot, timestamp = Metadata(Targets()), Metadata(Snapshot()), Metadata(Timestamp())
        new = [root_file(repo.dir)]
    else:
        targets, snapshot, timestamp = latest
        new = []
    bump = latest is not None  # a first release is version 1 of each
    known = targets.signed.targets.get(bundle.target)
    if known is not None and known.hashes != target.hashes:
        raise FleetError(f"{bundle.target} was released already with other contents (sha256 "
                         f"{known.hashes['sha256'][:12]}...): give this bundle a new --version")
    sha = target.hashes["sha256"]
    stored = targets_dir(repo.dir) / f"{sha}.{bundle.target}"
    if not stored.exists():
        stored.parent.mkdir(parents=True, exist_ok=True)
        tmp = stored.with_name(f".{stored.name}.tmp")
        shutil.copyfile(bundle_path, tmp)
        os.replace(tmp, stored)

    targets.signed.targets[bundle.target] = target
    targets.signed.version += bump
    targets.signed.expires = _expiry(targets_days)
    targets_path, targets_bytes = repo.write(targets, f"{targets.signed.version}.targets.json")

    snapshot.signed.meta["targets.json"] = MetaFile.from_data(targets.signed.version, targets_bytes, _HASHES)
    snapshot.signed.version += bump
    snapshot.signed.expires = _expiry(targets_days)
    snapshot_path, snapshot_bytes = repo.write(snapshot, f"{snapshot.signed.version}.snapshot.json")

    timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot.signed.version, snapshot_bytes, _HASHES)
    timestamp_path = repo.write_timestamp(timestamp, expires_days, bump=bump)
    return [*new, targets_path, snapshot_path, timestamp_path]


def refresh_timestamp(repo_dir: Path, *, expires_days: float = TIMESTAMP_DAYS) -> list[Path]:
    """Re-sign the timestamp alone (a new version, a new expiry); returns [timestamp.json]."""
    repo = Repository(repo_dir)
    latest = repo.latest()
    if latest is None:
        raise FleetError(f"{repo.dir}: nothing released yet, no timestamp to refresh (push a bundle first)")
    return [repo.write_timestamp(latest[2], expires_days)]

