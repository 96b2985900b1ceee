"""The layout's rules, checked on the source: layers point one way, no import circles.

    rlhf.contracts   interfaces, registry, schemas, checks: imports nothing else of rlhf
    rlhf.core        the library (with rlhf.embedded): contracts only, never a command or a plugin
    rlhf.apps        the commands: library and contracts, never a concrete plugin
    rlhf_plugins     the plugins: contracts and the core's public toolkit (rlhf.core.toolkit), never a
                     command nor any other part of the core

Every import counts: one inside a function (a lazy import is still a dependency) and one
under `if TYPE_CHECKING:` (an annotation is a dependency of the reader) alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rlhf": ROOT / "rlhf", "rlhf_plugins": ROOT / "plugins"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports (a package when no submodule is named)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import rlhf.core.x.y` names a module or its parent
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def layer(module: str) -> str:
    if module.startswith("rlhf_plugins"):
        return "plugins"
    if module.startswith("rlhf.contracts"):
        return "contracts"
    if module.startswith("rlhf.apps"):
        return "apps"
    if module.startswith("rlhf.core.toolkit"):
        return "toolkit"
    return "library"  # rlhf.core, rlhf.embedded and the top package


ALLOWED = {
    "contracts": {"contracts"},
    "library": {"contracts", "library", "toolkit"},
    "toolkit": {"contracts", "library", "toolkit"},
    "apps": {"contracts", "library", "toolkit", "apps"},
    "plugins": {"contracts", "toolkit", "plugins"},
}


def test_the_layout_has_its_layers():
    layers = {layer(m) for m in MODULES}
    assert layers == set(ALLOWED)
    assert {"rlhf.contracts.interfaces", "rlhf.contracts.registry", "rlhf.contracts.schema", "rlhf.core.loop.trainer",
            "rlhf.core.run.rundir", "rlhf.apps.train"} <= set(MODULES)


@pytest.mark.parametrize("kind", sorted(ALLOWED))
def test_dependencies_point_one_way(kind):
    wrong = {m: sorted(d for d in deps if layer(d) not in ALLOWED[kind])
             for m, deps in GRAPH.items() if layer(m) == kind}
    assert not {m: d for m, d in wrong.items() if d}, f"{kind} may import only {sorted(ALLOWED[kind])}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_two_modules_import_each_other_directly_or_in_a_circle():
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_circles():
    """The check above can fail: the circles the old flat layout had are found."""
    old = {"rlhf.sweep": {"rlhf.train"}, "rlhf.train": {"rlhf.sweep", "rlhf.config"},
           "rlhf.config": {"rlhf.reward_model"}, "rlhf.reward_model": {"rlhf.trainer"}, "rlhf.trainer": {"rlhf.config"}}
    assert sorted(cycles(old)) == [["rlhf.config", "rlhf.reward_model", "rlhf.trainer"], ["rlhf.sweep", "rlhf.train"]]


def test_lazy_imports_count():
    """An import inside a function is an edge."""
    deps = GRAPH["rlhf.apps.train"]
    assert "rlhf.core.loop.trainer" in deps  # imported inside _train()
    assert "rlhf.core.model.policy" not in GRAPH["rlhf.contracts.interfaces"]  # contracts name no library type
