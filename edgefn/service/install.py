"""Installing edgefn as a systemd service: the unit, an example config and an environment file put in
place under a root (`/`, or a folder for a test or an image being built), then systemd told.

    <root>/etc/systemd/system/edgefn.service   the unit, its ExecStart this very edgefn
    <root>/etc/edgefn/config.toml               the settings (kept when already there: the operator's)
    <root>/etc/edgefn/edgefn.env                secrets and overrides, mode 0600 (kept when already there)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgefn.errors import ConfigError

FILES = Path(__file__).parent / "files"
UNIT = "etc/systemd/system/edgefn.service"
CONFIG = "etc/edgefn/config.toml"
ENVIRONMENT = "etc/edgefn/edgefn.env"


@dataclass(frozen=True)
class Step:
    """One thing the install does: write a file (`path`, its `mode`), keep one, or run a command."""

    action: str  # "write", "keep" or "run"
    what: str  # the path, or the command line
    mode: int | None = None

    def __str__(self) -> str:
        return f"{self.action} {self.what}" + (f" (mode {self.mode:o})" if self.mode is not None else "")


def exec_start() -> str:
    """The command that starts this edgefn: the `edgefn` script beside this Python, else `python -m edgefn`."""
    script = Path(sys.executable).parent / "edgefn"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m edgefn"


def _packaged(name: str) -> bytes:
    """One of the files edgefn ships for the service; a ConfigError where the install lacks it."""
    try:
        return (FILES / name).read_bytes()
    except OSError as exc:
        raise ConfigError(f"this edgefn install lacks its service file {name} ({exc.strerror}): it was built "
                          f"without edgefn/service/files; install edgefn again from a complete checkout or wheel") from None


def unit_text(command: str | None = None) -> str:
    return _packaged("edgefn.service").decode().replace("{exec_start}", command or exec_start())


def plan(root: Path = Path("/"), *, enable: bool = True, command: str | None = None) -> list[tuple[Step, bytes | None]]:
    """What installing under `root` does, in order: each step, with the bytes a write puts there. systemctl
    is run only where `root` is this system's own /."""
    root = Path(root)
    steps: list[tuple[Step, bytes | None]] = [(Step("write", str(root / UNIT), 0o644), unit_text(command).encode())]
    for rel, source, mode in ((CONFIG, "config.toml", 0o644), (ENVIRONMENT, "edgefn.env", 0o600)):
        target = root / rel
        if target.exists():
            steps.append((Step("keep", str(target)), None))
        else:
            steps.append((Step("write", str(target), mode), _packaged(source)))
    if root.resolve() == Path("/"):
        steps.append((Step("run", "systemctl daemon-reload"), None))
        if enable:
            steps.append((Step("run", "systemctl enable --now edgefn.service"), None))
    return steps


def install(root: Path = Path("/"), *, enable: bool = True, dry_run: bool = False,
            command: str | None = None) -> list[Step]:
    """Put the service's files in place under `root` (and tell systemd, under /); with `dry_run`, only say
    what would be done. ConfigError says what could not be done."""
    done = []
    for step, data in plan(root, enable=enable, command=command):
        done.append(step)
        if dry_run or step.action == "keep":
            continue
        if step.action == "run":
            _run(step.what)
            continue
        path = Path(step.what)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, step.mode or 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data or b"")
            os.chmod(tmp, step.mode or 0o644)  # whatever the umask
            os.replace(tmp, path)
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc} (as root, or with --root DIR)") from None
    return done


def _run(command: str) -> None:
    if shutil.which("systemctl") is None:
        raise ConfigError(f"no systemctl here: the files are in place; run `{command}` where systemd runs")
    done = subprocess.run(shlex.split(command), capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"{command}: {(done.stderr or done.stdout).strip() or f'exit status {done.returncode}'}")
