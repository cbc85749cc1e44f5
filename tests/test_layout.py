"""The package layout: imports flow one way, and only through the public surface.

Read from the source with `ast`, so type-only and function-local imports
count as much as the ones at the top: a circle says two rooms are one, even
when Python happens to tolerate it.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "mcp_server", "embedstream")
ROOMS = ("pipeline.model", "pipeline.store", "pipeline.jobs")
SURFACES = ("pipeline", *ROOMS)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def imports(name: str) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(module, imported names) for every project import in a module, wherever it stands."""
    path = MODULES[name]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{name}: relative import"
            if node.module.split(".")[0] in PACKAGES:
                yield node.module, tuple(alias.name for alias in node.names)


def edges(name: str) -> set[str]:
    """The modules `name` depends on (a submodule imported from a package is the submodule)."""
    out = set()
    for module, names in imports(name):
        submodules = {f"{module}.{n}" for n in names} & MODULES.keys()
        out |= submodules
        if not submodules or len(submodules) < len(names):
            out.add(module)
    return out - {name}


def rank(name: str) -> int:
    """The floor a module stands on: it may import only from its own floor and below."""
    if name.startswith(ROOMS):
        return 1 + ROOMS.index(".".join(name.split(".")[:2]))
    if name == "pipeline.service":
        return 4
    if name == "pipeline":
        return 5
    if name.startswith("pipeline."):
        return 0  # the ground: settings, errors, keys, tasks, inputs
    if name.startswith(("workers", "mcp_server")):
        return 6
    return 7  # embedstream: the CLI that starts everything, and the client


def test_the_import_graph_has_no_circle() -> None:
    graph = {name: edges(name) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import circle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done:
            return
        for other in sorted(graph.get(name, ())):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_every_import_points_down() -> None:
    upward = [
        f"{name} (floor {rank(name)}) imports {other} (floor {rank(other)})"
        for name in MODULES for other in edges(name)
        if rank(other) > rank(name) and not (is_package(name) and other.startswith(name + "."))
    ]
    assert upward == []


def test_workers_and_the_server_never_import_each_other() -> None:
    crossing = [
        f"{name} imports {other}"
        for name in MODULES for other in edges(name)
        if (name.startswith("workers") and other.startswith("mcp_server"))
        or (name.startswith("mcp_server") and other.startswith("workers"))
    ]
    assert crossing == []


def test_outside_pipeline_only_its_public_surface_is_imported() -> None:
    private = []
    for name in MODULES:
        if name.startswith("pipeline"):
            continue
        for module, names in imports(name):
            if not module.startswith("pipeline"):
                continue
            public = set(getattr(importlib.import_module(module), "__all__", ()))
            if module not in SURFACES:
                private.append(f"{name}: {module}")
            private += [f"{name}: {module}.{n}" for n in names if n not in public]
    assert private == []


@pytest.mark.parametrize("surface", SURFACES)
def test_each_public_name_exists(surface: str) -> None:
    package = importlib.import_module(surface)
    assert [n for n in package.__all__ if not hasattr(package, n)] == []
