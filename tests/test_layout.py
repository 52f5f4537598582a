"""The house rules of the package's layout, read from its source: imports only run down
(data → model → sparsity → control → loop → launchers), no cycle, and no module or function
too long to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "dsl_dist"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, but those under `if TYPE_CHECKING:` (imports for annotations only, which
    never run)."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def imports(path: Path) -> set[str]:
    """The package's modules that `path` imports at run time, in functions too."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            while name and name not in MODULES:  # `from pkg.mod import name`: the module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def test_sparsity_never_imports_the_control_plane() -> None:
    offenders = {m: sorted(i for i in GRAPH[m] if i.startswith("dsl_dist.control"))
                 for m in GRAPH if m.startswith("dsl_dist.sparsity")}
    assert not {m: i for m, i in offenders.items() if i}


def test_lower_layers_never_import_higher_ones() -> None:
    layers = ["dsl_dist.data", "dsl_dist.model", "dsl_dist.sparsity", "dsl_dist.control"]
    for low, module in ((i, m) for i, layer in enumerate(layers) for m in GRAPH
                        if m.startswith(layer)):
        higher = [m for m in GRAPH[module] if any(m.startswith(layer)
                                                   for layer in layers[low + 1:])]
        assert not higher, f"{module} imports {higher}"


def test_no_import_cycle() -> None:
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == "open":
                cycle = path[path.index(imported):] + [imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def too_long(name: str, source: str) -> list[str]:
    """The module (if over MAX_MODULE_LINES) and its functions over MAX_FUNCTION_LINES."""
    found = [f"{name} ({len(source.splitlines())} lines)"] \
        if len(source.splitlines()) > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}.{node.name} ({length} lines)")
    return found


def test_modules_and_functions_are_short() -> None:
    assert not [entry for name, path in MODULES.items()
                for entry in too_long(name, path.read_text())]


def test_the_rules_can_fail(tmp_path: Path) -> None:
    """The checks see what they should: a long function, a long module, a runtime import
    (and not an annotation-only one)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert too_long("m", f"def f():\n{body}\n") == ["m.f (81 lines)"]
    assert too_long("m", "x = 1\n" * (MAX_MODULE_LINES + 1)) == ["m (401 lines)"]
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    import dsl_dist.train\n"
                      "def f():\n    from dsl_dist.control.controller import X\n")
    assert imports(source) == {"dsl_dist.control.controller"}
