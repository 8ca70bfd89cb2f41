"""The house's one rule: imports flow one way, entry points → sweep → training run → tracking and
workers → backends → ground, with no circle. Read from the source (imports inside functions
included), so a new module or import that breaks the rule fails here, naming it."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Floors, highest first; a module may import only modules on its own floor (no circle) or lower.
FLOORS = {
    "entry": ["abalone.train", "abalone.container", "abalone.storage_proxy",
              "hydra_plugins.abalone_optuna_sweeper.sweeper"],
    "sweep": ["abalone.sweep"],
    "run": ["abalone.run", "abalone.outputs", "abalone.callbacks", "abalone.evaluate"],
    "tracking and workers": ["abalone.tracking", "abalone.workers"],
    "backends": ["abalone.aws", "abalone.data", "abalone.model", "abalone.mlp_program", "abalone.serving",
                 "abalone.search_spaces", "abalone.dataset", "abalone.table",
                 "abalone.source"],
    "ground": ["abalone.config", "abalone.redact", "abalone.trial", "abalone",
               "hydra_plugins.abalone_optuna_sweeper.config",
               "hydra_plugins.abalone_optuna_sweeper"],
}
LEVEL = {prefix: len(FLOORS) - i for i, prefixes in enumerate(FLOORS.values())
         for prefix in prefixes}


def modules() -> dict[str, Path]:
    found = {}
    for root in ("abalone", "hydra_plugins"):
        for path in (REPO / root).rglob("*.py"):
            if "conf" in path.relative_to(REPO).parts:
                continue
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def level(module: str) -> int:
    prefix = max((p for p in LEVEL if module == p or module.startswith(p + ".")), key=len)
    return LEVEL[prefix]


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    edges = {name: imports(path, set(found)) - {name} for name, path in found.items()}
    # A package's __init__ re-exports its modules: importing the package is not an edge back.
    return {name: {t for t in targets if not name.startswith(t + ".")}
            for name, targets in edges.items()}


def test_every_module_has_a_floor():
    assert all(level(name) for name in modules())


def test_imports_never_go_up():
    upward = [f"{name} ({level(name)}) imports {target} ({level(target)})"
              for name, targets in graph().items() for target in targets
              if level(target) > level(name)]
    assert upward == []


def test_no_import_circle():
    edges = graph()
    circles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for target in sorted(edges.get(name, ())):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])
    assert circles == []


def test_the_container_entry_point_imports_no_hydra_plugin():
    assert not any(t.startswith("hydra_plugins") for t in graph()["abalone.container"])
