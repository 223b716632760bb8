"""Bundles: a release of functions, their models and a health check, packed in one reproducible tar.

    bundle.json                      BundleManifest: name, version, functions, models, health, files (sha256)
    functions/<name>/edgefn.toml     the manifest
    functions/<name>/<name>.wasm     the built component
    functions/<name>/<name>.<target>.cwasm[.json]   compiled for a target (x86_64, aarch64), and its stamp
    models/<model>/model.json        only the variants shipped
    models/<model>/<variant files>
    health.json                      HealthCheck (optional)

The tar is uncompressed, its entries sorted, with mtime 0 and uid/gid 0: the same input gives the
same bytes, so a bundle is named by its sha256. This module holds the format: bundle.json's models
and the rules every path in a bundle follows. `pack` builds a bundle; a device unpacks it
(`unpack.unpack`) into a folder it never changes once complete, and runs its health check
(`health.check_health`) through the new functions before it trusts them.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefn.functions.manifest import MANIFEST
from edgefn.protocol.fleet import parse_version, target_name

BUNDLE_JSON = "bundle.json"
HEALTH_JSON = "health.json"
BUNDLE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
CHUNK = 1 << 20  # bytes read at a time when hashing or copying a file


def safe_path(path: str) -> str:
    """A relative POSIX path inside the bundle: no absolute path, no '..', no empty or odd part."""
    pure = PurePosixPath(path)
    if (not path or "\\" in path or pure.is_absolute() or str(pure) != path
            or any(part in ("", ".", "..") for part in pure.parts)):
        raise ValueError(f"{path!r} is not a safe relative path")
    return path




class BundleFunction(BaseModel):
    """One function of a bundle: its manifest and component lie under `path`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The function's name (its manifest's function.name).")
    version: str = Field(description="The function's own version (its manifest's function.version).")
    path: str = Field(description="Its folder in the bundle: functions/<name>.")
    targets: list[str] = Field(default_factory=list,
                               description="The targets its component is shipped compiled for (x86_64, aarch64): "
                                           "a device of one maps it and compiles nothing.")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return safe_path(value)

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        for target in value:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", target):
                raise ValueError(f"{target!r} is not a target name (e.g. x86_64, aarch64)")
        return value

    def folder(self, root: Path) -> Path:
        """Its folder (with edgefn.toml) in a bundle unpacked at `root`."""
        return Path(root) / self.path

    def component(self, root: Path) -> Path:
        """Its built component in a bundle unpacked at `root`."""
        return Path(root) / self.path / f"{self.name}.wasm"

    def precompiled(self, target: str) -> str:
        """Its component compiled for `target`, as a path in the bundle (its stamp: + ".json")."""
        return f"{self.path}/{self.name}.{target}.cwasm"


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
            safe_path(path)
            if path == BUNDLE_JSON or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{path!r}: expected a file path and its sha256 (64 hex digits)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> BundleManifest:
        needed = [f"{fn.path}/{MANIFEST}" for fn in self.functions]
        needed += [f"{fn.path}/{fn.name}.wasm" for fn in self.functions]
        needed += [p for fn in self.functions for t in fn.targets
                   for p in (fn.precompiled(t), fn.precompiled(t) + ".json")]
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
