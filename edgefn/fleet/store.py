"""What a device remembers of its fleet releases, in `<state_dir>/fleet/`, and how it writes it.

    active.json    {"current": Release | null, "previous": Release | null, "refused": [...]}
                   the one switch: the daemon runs `current`'s functions (its --functions when null)
    update.json    {"release": Release, "step": STEP, "rollout": id} while an update is under way
    bundles/<sha256>/   unpacked releases (edgefn.fleet.unpack.unpack: whole or absent)
    audit.jsonl    activations, rollbacks and refusals, appended (edgefn.fleet.audit)

Both files are replaced whole (temporary file, fsync, rename, fsync of the folder), so a SIGKILL
at any moment leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field, ValidationError

from edgefn.errors import FleetError
from edgefn.files import write_atomic
from edgefn.fleet.audit import AUDIT_FILE, DeviceAudit
from edgefn.protocol.fleet import UPDATE_STEPS, GateRule

_M = TypeVar("_M", bound=BaseModel)


class Release(BaseModel):
    """One published bundle version, as a device runs it."""

    bundle: str
    version: str
    target: str  # its TUF target name
    sha256: str = ""  # of the bundle file; names its folder under bundles/

    @property
    def label(self) -> str:
        return f"{self.bundle}@{self.version}"

    def same(self, bundle: str | None, version: str | None) -> bool:
        return (self.bundle, self.version) == (bundle, version)


class Active(BaseModel):
    current: Release | None = None
    previous: Release | None = None
    rollout: int | None = None  # the rollout that installed `current`
    # "<rollout>:<bundle>@<version>" of releases rolled back or refused here: not tried again for that rollout
    refused: list[str] = Field(default_factory=list)

    def refusing(self, release: Release, rollout: int | None, *, run: Release | None) -> Active:
        """`run` becomes current, `release` is refused for `rollout` (a rollback, or a release that does not load)."""
        return Active(current=run, previous=None, rollout=None,
                      refused=[*self.refused, refusal_key(rollout, release.bundle, release.version)])


class Update(BaseModel):
    release: Release
    step: str
    rollout: int | None = None
    gate: list[GateRule] = Field(default_factory=list)  # the rollout's, for the soak after a restart
    soak_s: float = 0.0
    fleet_rollback: bool = False  # the fleet sending the device back to its previous release


def refusal_key(rollout: int | None, bundle: str | None, version: str | None) -> str:
    return f"{rollout}:{bundle}@{version}"


class FleetStore:
    """active.json and update.json of one device."""

    def __init__(self, fleet_dir: Path):
        self.dir = Path(fleet_dir)
        self.active_file = self.dir / "active.json"
        self.update_file = self.dir / "update.json"
        self.bundles = self.dir / "bundles"
        self.audit = DeviceAudit(self.dir / AUDIT_FILE)

    def bundle_dir(self, release: Release) -> Path:
        return self.bundles / release.sha256

    def active(self) -> Active:
        return self._read(self.active_file, Active) or Active()

    def set_active(self, active: Active) -> None:
        write_atomic(self.active_file, active.model_dump_json(indent=1).encode())

    def update(self) -> Update | None:
        return self._read(self.update_file, Update)

    def set_update(self, release: Release, step: str, rollout: int | None, gate: list[GateRule],
                   soak_s: float, fleet_rollback: bool = False) -> None:
        assert step in UPDATE_STEPS, step
        update = Update(release=release, step=step, rollout=rollout, gate=gate, soak_s=soak_s,
                        fleet_rollback=fleet_rollback)
        write_atomic(self.update_file, update.model_dump_json().encode())

    def end_update(self) -> None:
        self.update_file.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path, model: type[_M]) -> _M | None:
        try:
            return model.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as exc:
            raise FleetError(f"{path}: unreadable fleet state ({exc}); remove it to start over") from None
