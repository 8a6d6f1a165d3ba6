"""The package's import graph has no circles.

Read from the source with `ast` (nothing is imported): every `import` and
`from ... import` in vsml_jax/, also those inside functions, because a late
import inside a function is how a circle is usually hidden. A module
imports the package `__init__` it names (`from vsml_jax.data import x` where x
is not a submodule), not the parents a Python import also runs.
"""
import ast
import os

PACKAGE = "vsml_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules() -> dict:
    """Module name -> path, for every .py file under vsml_jax/."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))
                name = rel[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = \
                    os.path.join(folder, f)
    return out


def import_graph() -> dict:
    """Module -> set of vsml_jax modules it imports (explicitly, anywhere in it)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package of this module
                    base = name.split(".")
                    base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def find_circles(graph: dict) -> list:
    """Every strongly connected set of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_finder_finds_a_circle():
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_late_and_relative_imports():
    graph = import_graph()
    assert "vsml_jax.data.sources" in graph["vsml_jax.data.files"]
    assert "vsml_jax.data.files" in graph["vsml_jax.data"]


def test_no_import_circles_in_the_package():
    circles = find_circles(import_graph())
    assert not circles, ("modules that import each other (directly or around a circle; "
                         "move the shared part to a third module): "
                         + "; ".join(" <-> ".join(c) for c in circles))
