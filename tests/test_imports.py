"""The import arrows of edgefn and cloud_sync point one way (docs: "Each folder has one job").

Read from the source with `ast`, nothing imported: a module's import-time imports are those at module
level (in `if`/`try` blocks and class bodies too), not those inside functions (deferred on purpose) nor
under `if TYPE_CHECKING:`. `from a import b` is an arrow to the module a.b when there is one, else to a.

- No circle: every circle found is reported, as a path of modules, each with the arrows that make it.
- cloud_sync uses only what it shares with the device (wire formats, errors, the model registry its
  reference endpoint runs, the bundle format): never the CLI or the daemon, not even through those.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edgefn", "cloud_sync")
NOT_HOST_CODE = ("edgefn/functions/guest/",)  # runs inside the sandbox, imported there as a top-level module

# What cloud_sync may import of edgefn besides the package itself (__version__): a module, or a package and
# everything in it.
CLOUD_MAY_USE = (
    "edgefn.errors",
    "edgefn.protocol",  # the wire formats shared with the device
    "edgefn.topics",
    "edgefn.inference",  # the reference OIP endpoint runs models as the device does
    "edgefn.fleet.bundle",  # the bundle format the fleet server publishes
    "edgefn.fleet.unpack",  # reading a bundle safely (the server checks what it publishes)
)
# What cloud_sync must not reach, even through the modules it may use: the CLI and the daemon.
CLOUD_MUST_NOT_REACH = ("edgefn.cli", "edgefn.daemon", "edgefn.dispatch")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(NOT_HOST_CODE):
                continue
            parts = rel.removesuffix(".py").split("/")
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time(node.body)
            yield from _import_time(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _import_time(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _import_time(node.body)


def _every_import(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    return (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The modules of ours (in MODULES) that one import statement of `module` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    for name in names:
        while name and name not in MODULES:  # `import a.b.c` of a name that is not a module: its nearest module
            name = name.rpartition(".")[0]
        if name:
            yield name


def import_graph(*, import_time_only: bool = True) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the (first) import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        arrows: dict[str, int] = {}
        for node in _import_time(tree.body) if import_time_only else _every_import(tree):
            for target in _targets(module, node):
                if target != module:
                    arrows.setdefault(target, node.lineno)
        graph[module] = arrows
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:  # iterative: no recursion limit on a long chain
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def a_circle(graph: dict[str, dict[str, int]], group: list[str]) -> list[str]:
    """One shortest circle through the group's first module, staying inside the group."""
    start, inside = group[0], set(group)
    came_from: dict[str, str] = {}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if child in inside and child not in came_from:
                came_from[child] = node
                todo.append(child)
    raise AssertionError(f"no circle through {start}")  # pragma: no cover - a group always has one


def describe(graph: dict[str, dict[str, int]], circle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(circle, circle[1:], strict=False)) + f" -> {circle[-1]}"


def circles() -> list[str]:
    """Every group of modules that import each other at import time, each as one circle through it."""
    graph = import_graph()
    return [f"{len(group)} modules {group}; e.g. {describe(graph, a_circle(graph, group))}"
            for group in strongly_connected(graph)]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _is_cli(module: str) -> bool:
    return _within(module, ("edgefn.cli",)) or module.endswith("_cli")


def test_no_import_circles():
    found = circles()
    assert not found, "import circles:\n" + "\n".join(found)


def test_cloud_sync_imports_only_what_it_shares_with_the_device():
    graph = import_graph(import_time_only=False)  # deferred imports are dependencies too
    wrong = [f"{module} imports {target} (line {line})"
             for module, arrows in graph.items() if _within(module, ("cloud_sync",))
             for target, line in arrows.items()
             if _within(target, ("edgefn",)) and target != "edgefn" and not _within(target, CLOUD_MAY_USE)]
    assert not wrong, "\n".join(wrong)


def test_cloud_sync_never_loads_the_cli_or_the_daemon():
    graph = import_graph()
    for module in MODULES:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = module.split(".")
        graph[module].update({p: 0 for p in (".".join(parts[:n]) for n in range(1, len(parts))) if p in MODULES})
    came_from: dict[str, str] = {}
    todo = deque(m for m in MODULES if _within(m, ("cloud_sync",)))
    seen = set(todo)
    while todo:
        node = todo.popleft()
        for child in graph[node]:
            if child not in seen:
                seen.add(child)
                came_from[child] = node
                todo.append(child)
    reached = sorted(m for m in seen if _is_cli(m) or _within(m, CLOUD_MUST_NOT_REACH))

    def chain(module: str) -> str:
        path = [module]
        while path[-1] in came_from:
            path.append(came_from[path[-1]])
        return " <- ".join(path)

    assert not reached, "cloud_sync loads:\n" + "\n".join(chain(m) for m in reached)


def test_the_graph_reads_the_tree():
    graph = import_graph()
    assert "edgefn.errors" in graph["edgefn.config"]
    assert "edgefn.protocol.oip" in graph["cloud_sync.serve"]  # `from edgefn.protocol import oip`
    assert "edgefn.fleet.agent" not in graph["edgefn.daemon"]  # under `if TYPE_CHECKING:`
    assert strongly_connected({"a": {"b": 1}, "b": {"a": 1}, "c": {"a": 1}}) == [["a", "b"]]


# -- the CLI sits on top: nothing imports it back, and its command modules share only the toolkit ------

ENTRY_POINTS = ("edgefn.__main__",)  # `python -m edgefn`


@functools.cache
def _every_arrow() -> dict[str, dict[str, int]]:
    return import_graph(import_time_only=False)  # an import inside a function is an arrow too


def _cli_arrows(module: str) -> set[str]:
    return {target for target in _every_arrow().get(module, {}) if _within(target, ("edgefn.cli",))}


def test_nothing_outside_the_cli_imports_it():
    offenders = {module: sorted(_cli_arrows(module)) for module in MODULES
                 if not _within(module, ("edgefn.cli",)) and module not in ENTRY_POINTS and _cli_arrows(module)}
    assert offenders == {}


def test_command_modules_share_only_the_toolkit():
    commands = [m for m in MODULES if _within(m, ("edgefn.cli",)) and m.rpartition(".")[2]
                not in ("cli", "main", "__main__")]
    assert {m.rpartition(".")[2] for m in commands} >= {"_toolkit", "run", "fn", "model", "profile", "bundle",
                                                         "cloud", "fleet"}
    offenders = {m: sorted(t for t in _cli_arrows(m) if t != "edgefn.cli._toolkit") for m in commands}
    assert {m: found for m, found in offenders.items() if found} == {}
    assert _cli_arrows("edgefn.cli._toolkit") == set()
