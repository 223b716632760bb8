"""The import arrows of the layout, read from the source with `ast`: the CLI sits on top, nothing imports it
back, and its command modules share only the toolkit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "edgefn" / "cli"
ENTRY_POINTS = {ROOT / "edgefn" / "__main__.py"}  # `python -m edgefn`


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str | None = None) -> set[str]:
    """Every module (and name) `path` imports, at the top or inside functions, relative imports resolved
    as if it were the module `name` (default: its place in the tree)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def cli_imports(path: Path) -> set[str]:
    return {m for m in imported(path) if m == "edgefn.cli" or m.startswith("edgefn.cli.")}


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_imports_are_found_however_spelled(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import edgefn.cli.main\nfrom edgefn import cli\nfrom . import _toolkit\n"
                     "def f():\n    from ..cli.fleet import push\n")
    assert imported(probe, "edgefn.cli.probe") >= {"edgefn.cli.main", "edgefn.cli", "edgefn.cli._toolkit",
                                                    "edgefn.cli.fleet", "edgefn.cli.fleet.push"}


@pytest.mark.parametrize("folder", ["edgefn", "cloud_sync"])
def test_nothing_outside_the_cli_imports_it(folder: str) -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(cli_imports(p)) for p in sources(folder)
                 if CLI not in p.parents and p not in ENTRY_POINTS and cli_imports(p)}
    assert offenders == {}


def test_command_modules_share_only_the_toolkit() -> None:
    commands = [p for p in sources("edgefn/cli") if p.name not in ("main.py", "__main__.py", "__init__.py")]
    assert {p.stem for p in commands} >= {"_toolkit", "run", "fn", "model", "profile", "bundle", "cloud", "fleet"}
    offenders = {p.name: sorted(m for m in cli_imports(p) if not m.startswith("edgefn.cli._toolkit"))
                 for p in commands}
    assert {name: found for name, found in offenders.items() if found} == {}
    assert cli_imports(CLI / "_toolkit.py") == set()
