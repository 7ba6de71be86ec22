"""The package's shape: one direction of imports, modules of a readable size, no private names across modules.

Every module under ``spa/`` is parsed with ``ast`` (nothing is imported), and every import of a ``spa``
module is collected, at module level and inside functions alike, relative ones resolved against the
module's package. An import names the module it reads from: ``from spa.io import load_model`` reads
``spa/io/__init__.py``, ``from spa.io import load`` (a submodule) reads ``spa/io/load.py``. The
packages an import passes through on the way (``spa``, ``spa.io``) are not counted: Python imports
them first whatever the import says, and counting them would tie every module to ``spa/__init__.py``.
So a re-exporting ``__init__`` is an ordinary node: a sibling that imports from it instead of from
the module that holds the name closes a circle, and this test says so.  Between folders, imports
go down the pipeline only (``LAYERS``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spa"
MAX_LINES = 650


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    """The package a relative import in module ``name`` is resolved against."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(name: str, path: Path, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = _package_of(name, path).split(".")
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(name: str, path: Path):
    """Yield ``(target module, imported name or None, line)`` for every spa import in one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "spa" or alias.name.startswith("spa."):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, path, node.level, node.module)
            if not (target == "spa" or target.startswith("spa.")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:        # ``from spa.io import load``: the submodule
                    yield sub, None, node.lineno
                else:                     # ``from spa.io import load_model``: the package's __init__
                    yield target, alias.name, node.lineno


def import_graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imports(name, path):
            if target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            for child in children:
                if child not in colour:
                    continue
                if colour[child] == GREY:
                    return path[path.index(child):] + [child]
                if colour[child] == WHITE:
                    colour[child] = GREY
                    path.append(child)
                    stack.append((child, iter(sorted(graph[child]))))
                    break
            else:
                colour[node] = BLACK
                path.pop()
                stack.pop()
    return None


def test_every_import_names_a_module():
    missing = [f"{path.relative_to(ROOT)}:{line}: {target}"
               for name, path in MODULES.items() for target, _, line in imports(name, path)
               if target not in MODULES]
    assert not missing, "imports of spa modules that do not exist:\n" + "\n".join(missing)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle (function-level imports count): " + " -> ".join(cycle)


def test_modules_are_small():
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_private_names_across_modules():
    leaks = [f"{path.relative_to(ROOT)}:{line}: from {target} import {imported}"
             for name, path in MODULES.items() for target, imported, line in imports(name, path)
             if imported and imported.startswith("_") and not imported.startswith("__") and target != name]
    assert not leaks, "private names imported from another module:\n" + "\n".join(leaks)


#: the pipeline's folders, lowest first: a module imports only from its own folder or a lower one
#: (``spa`` is spa/__init__.py and spa/__main__.py; ``zoo`` is spa/zoo.py, the public name of spa.io.zoo;
#: ``progress`` is spa/progress.py, the progress lines every stage may print; ``sweep`` is spa/sweep.py, many
#: prunes of one model; ``olive`` is spa/olive.py, the Olive pass; ``moe`` the whole-expert stage, ``depth``
#: the residual-block stage; ``options`` is spa/options.py, PruneOptions and its checks)
LAYERS = [("errors", "progress"), ("io",), ("runtime",), ("ops",), ("graph",), ("scoring",), ("planning",), ("surgery",),
          ("verify", "mapping", "moe", "depth", "rotation"), ("options",), ("api",), ("sweep", "olive"), ("cli",),
          ("spa", "zoo", "__main__")]


def _folder(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "spa"


def test_imports_go_one_way():
    rank = {folder: i for i, layer in enumerate(LAYERS) for folder in layer}
    unknown = sorted({_folder(m) for m in MODULES} - set(rank))
    assert not unknown, f"folders of spa/ without a place in LAYERS: {unknown}"
    upward = [f"{path.relative_to(ROOT)}:{line}: imports {target}"
              for name, path in MODULES.items() for target, _, line in imports(name, path)
              if target in MODULES and _folder(target) != _folder(name)
              and rank[_folder(target)] >= rank[_folder(name)]]
    assert not upward, "imports that do not go down the pipeline:\n" + "\n".join(upward)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_find_cycle_finds_circles(graph, cycle):
    assert find_cycle(graph) == cycle
