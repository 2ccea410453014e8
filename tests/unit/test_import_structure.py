"""The structure the code promises (DESIGN §3, §7): no import circles anywhere, cores free of
gRPC, the trainer's rooms depending on each other in one direction, and small modules.

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import hides a
circle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"services": ROOT / "services", "dreambooth_client": ROOT / "clients/python/src/dreambooth_client"}
TRAINER_ROOMS = ("api", "jobs", "driver", "worker")
# Which trainer room may import which (the process that runs it; DESIGN §7): the server side
# (api, jobs) never imports the training stack, and the worker never reaches back to the driver.
ALLOWED_ROOM_IMPORTS = {
    "api": {"api", "jobs"},
    "jobs": {"jobs"},
    "driver": {"driver", "worker"},
    "worker": {"worker"},
}
MAX_TRAINER_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(path: Path, known: set[str]) -> set[str]:
    """The known modules `path` imports (`from a import b` counts as a.b when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        # A package's __init__ being imported on the way to a submodule is not a dependency.
        graph[name] = {dep for dep in _imports(path, known) if dep != name and not name.startswith(dep + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["services", "trainer"] and len(parts) > 2 and parts[2] in TRAINER_ROOMS:
        return parts[2]
    return None


def test_trainer_rooms_depend_in_one_direction() -> None:
    wrong = []
    for module, deps in _graph().items():
        room = _room(module)
        if room is None:
            continue
        for dep in deps:
            other = _room(dep)
            if other is not None and other not in ALLOWED_ROOM_IMPORTS[room]:
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


@pytest.mark.parametrize("room", ["jobs", "driver", "worker"])
def test_trainer_cores_import_no_grpc(room: str) -> None:
    for path in (ROOT / "services/trainer" / room).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("grpc", "dreambooth.v1")), f"{path.name} imports {name}"


def test_trainer_modules_stay_small() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in (ROOT / "services/trainer").rglob("*.py")
    }
    assert {name: lines for name, lines in sizes.items() if lines >= MAX_TRAINER_MODULE_LINES} == {}
