"""No import circles in the package: every module's imports, also those inside functions, form no cycle.

A circle (a imports b, b imports a, directly or through others) makes modules impossible to change or load one at
a time, and hides behind imports placed inside functions: this walks the source with ``ast``, so it sees those
too, as well as ``TYPE_CHECKING`` imports.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mm2latent"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from . import x`` counts as importing module ``x``).

    Importing a package's ``__init__`` is not an edge: the package files here only hold lazy name tables.
    """
    files = {module_name(path, package.parent): path for path in package.rglob("*.py")}
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name if name in packages else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in files and c != name and c not in packages)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one import path round it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(path_round(graph, set(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def path_round(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through a component, as the modules in import order (the first repeated at the end)."""
    start = min(component)
    parents = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for other in sorted(graph[node] & component):
            if other == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return list(reversed(path)) + [start]
            if other not in parents:
                parents[other] = node
                queue.append(other)
    return sorted(component)


def test_the_checker_finds_a_circle_through_an_import_inside_a_function(tmp_path):
    package = tmp_path / "mm2latent"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import mm2latent.a\n")
    (package / "d.py").write_text("from . import c\n")
    assert cycles(import_graph(package)) == [["mm2latent.a", "mm2latent.sub.b", "mm2latent.c", "mm2latent.a"]]


def test_the_package_has_no_import_circle():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in found)
