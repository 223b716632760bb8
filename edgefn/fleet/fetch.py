"""The device's side of TUF: fetch a release from the fleet server and trust it only once verified.

    <state_dir>/fleet/root.json      the trusted root, copied once from the file the device was given
    <state_dir>/fleet/tuf/           python-tuf's metadata (what the device trusts now)
    <state_dir>/fleet/downloads/     targets as downloaded and verified

`ReleaseFetcher.fetch` runs python-tuf's client workflow (`tuf.ngclient.Updater`): it refuses a
wrong hash or length, a bad signature, metadata older than what the device already trusts
(rollback), expired metadata (freeze) and metadata that does not agree with itself (mix-and-match).
Each refusal becomes `UpdateRefused` saying which, in words; a server that cannot be reached
becomes `FleetError`. Metadata that looks expired while this device's clock is off from the
server's (its HTTP Date) is `ClockSkew`: the device's problem, not a refusal of the release. `check_not_older` is the release-level check TUF cannot make: a correctly
signed bundle that is older than the one running.
"""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import Updater
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from edgefn.config import redact_url
from edgefn.errors import ClockSkew, FleetError, UpdateRefused
from edgefn.files import write_atomic
from edgefn.protocol.fleet import METADATA_PATH, TARGETS_PATH, parse_version


def check_not_older(current_version: str | None, new_version: str) -> None:
    """Refuse (UpdateRefused) a release older than the one running; the same version or a newer one passes.

    A fleet rolling a device back to its previous release does so on purpose and skips this check."""
    try:
        new = parse_version(new_version)
        current = parse_version(current_version) if current_version is not None else None
    except ValueError as exc:
        raise UpdateRefused(f"release version: {exc}") from None
    if current is not None and new < current:
        raise UpdateRefused(f"release {new_version} is older than {current_version}, which runs here "
                            "(a downgrade is refused)")


CLOCK_TOLERANCE_S = 300.0  # a device clock further than this from the server's is off


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if abs(seconds) >= 86400 else f"{seconds:.0f} s"


_ROLLBACK = re.compile(r"must be >=|Expected \S+\.json version|Expected root version")
_MIX = re.compile(r"Expected (snapshot|targets) v|Expected snapshot version|missing info|does not contain information")


def _bad_version(exc: tuf_errors.BadVersionNumberError) -> UpdateRefused:
    text = str(exc)
    if _ROLLBACK.search(text):
        return UpdateRefused(f"rollback refused: the server offers metadata older than what this device "
                             f"already trusts ({text})")
    if _MIX.search(text):
        return UpdateRefused(f"mix-and-match refused: the metadata served does not agree with itself ({text})")
    return UpdateRefused(f"rollback or mix-and-match refused: version numbers do not add up ({text})")


def _refusal(exc: Exception, what: str, *, target: bool) -> FleetError:
    """python-tuf's error -> UpdateRefused (the release is not trustworthy) or FleetError (no answer)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return UpdateRefused(f"{what}: wrong length, larger than its signed metadata says (tampered or corrupted)")
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        return FleetError(f"{what}: the fleet server answered HTTP {exc.status_code}", status=exc.status_code)
    if isinstance(exc, tuf_errors.DownloadError):
        cause = exc.__cause__ or exc.__context__
        reason = getattr(cause, "reason", None) or cause  # urllib3's MaxRetryError carries the real one
        return FleetError(f"{what}: the fleet server cannot be reached ({reason or text})")
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return UpdateRefused(f"stale metadata refused (freeze?): {text}")
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return UpdateRefused(f"untrusted metadata refused: not signed by the keys the trusted root names ({text})")
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return _bad_version(exc)
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        if target:
            return UpdateRefused(f"{what}: wrong hash or length, not the bytes that were signed "
                                 f"(tampered or corrupted): {text}")
        return UpdateRefused(f"mix-and-match refused: metadata does not match the hash the snapshot or timestamp "
                             f"gives it ({text})")
    if isinstance(exc, tuf_errors.RepositoryError):
        return UpdateRefused(f"untrusted metadata refused: {text}")
    if isinstance(exc, OSError):
        return FleetError(f"{what}: cannot write the fleet state: {exc}")
    return FleetError(f"{what}: {type(exc).__name__}: {text}")


class ReleaseFetcher:
    """Verified downloads of a fleet's releases into `fleet_dir` (a device's `<state_dir>/fleet`).

    The root of trust is `fleet_dir/root.json`, copied from `root_file` the first time; later roots
    come signed through TUF. Every `fetch` is a fresh TUF refresh against the server."""

    def __init__(self, fleet_dir: Path, server_url: str, root_file: Path | None = None, *, timeout: int = 30):
        self.dir = Path(fleet_dir)
        self.root_path = self.dir / "root.json"
        self.metadata_dir = self.dir / "tuf"
        self.downloads = self.dir / "downloads"
        self.server_url = server_url.rstrip("/")
        self.shown = redact_url(self.server_url)  # what errors say
        self.timeout = timeout
        if not self.root_path.exists():
            self._bootstrap(root_file)
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)

    def _bootstrap(self, root_file: Path | None) -> None:
        if root_file is None:
            raise FleetError(f"{self.root_path}: no trusted root yet; give the fleet's root metadata once "
                             "(--fleet-root FILE, the 1.root.json of `edgefn fleet keys init`)")
        try:
            data = Path(root_file).read_bytes()
        except OSError as exc:
            raise FleetError(f"{root_file}: cannot read the fleet root: {exc.strerror or exc}") from None
        write_atomic(self.root_path, data)

    def _updater(self) -> Updater:
        try:
            return Updater(str(self.metadata_dir), f"{self.server_url}{METADATA_PATH}", str(self.downloads),
                           f"{self.server_url}{TARGETS_PATH}", fetcher=Urllib3Fetcher(socket_timeout=self.timeout),
                           bootstrap=self.root_path.read_bytes())
        except (tuf_errors.RepositoryError, ValueError) as exc:
            raise UpdateRefused(f"{self.root_path}: not a valid, self-signed TUF root: {exc}") from None

    def _check_clock(self, exc: Exception) -> None:
        """Expired metadata: ClockSkew when this device's clock is off from the server's, else nothing (the
        metadata really expired: a refusal)."""
        try:
            answer = httpx.get(f"{self.server_url}{METADATA_PATH}timestamp.json", timeout=self.timeout)
            server = parsedate_to_datetime(answer.headers["date"]).timestamp()
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return  # no time to compare with: judged as TUF judged it
        skew = time.time() - server
        if abs(skew) > CLOCK_TOLERANCE_S:
            raise ClockSkew(f"this device's clock is {_days(abs(skew))} {'ahead of' if skew > 0 else 'behind'} the "
                            f"fleet server's, so its signed metadata looks expired here ({exc}); set the clock "
                            "(NTP): the update is tried again then") from None

    def fetch(self, target: str) -> Path:
        """Refresh the metadata, then the target's verified file (downloaded, or the one already here)."""
        for attempt in (1, 2):
            updater = self._updater()
            try:
                updater.refresh()
                info = updater.get_targetinfo(target)
                break
            except Exception as exc:  # noqa: BLE001 - every python-tuf failure is mapped, see _refusal
                if isinstance(exc, tuf_errors.ExpiredMetadataError):
                    self._check_clock(exc)
                    if attempt == 1:  # the clock looks sane now: NTP may have set it since TUF looked
                        continue
                raise _refusal(exc, f"{self.shown}{METADATA_PATH}", target=False) from exc
        if info is None:
            raise UpdateRefused(f"{target}: not among the signed targets (not released, or signed with other keys)")
        cached = updater.find_cached_target(info)
        if cached is not None:
            return Path(cached)
        try:
            return Path(updater.download_target(info))
        except Exception as exc:  # noqa: BLE001
            raise _refusal(exc, target, target=True) from exc
