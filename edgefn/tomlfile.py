"""TOML files a person writes (the daemon's config, a function's manifest, a device profile): read alike
on Python 3.11 (tomllib) and 3.10 (tomli, JetPack 6), every way of failing one error of the caller's
type that names the file and the cause."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from edgefn.errors import EdgefnError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib


def read_toml(path: Path, error: type[EdgefnError], missing: str = "file not found") -> dict[str, Any]:
    """The file's table; `error(...)` where it is missing (`missing` says what that means to the user),
    unreadable, not UTF-8 or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from None
