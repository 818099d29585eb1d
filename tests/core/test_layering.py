"""The package's layering, read from the source (nothing is imported): no import circle among
clip_fast's modules, the core imports nothing above it, and ``kernels/`` (shipped as
``clip_fast.kernels``) imports nothing from clip_fast but the core."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _modules():
    """{module name: path} for clip_fast/ and kernels/ (mapped to clip_fast.kernels)."""
    out = {}
    for top, package in (("clip_fast", "clip_fast"), ("kernels", "clip_fast.kernels")):
        base = os.path.join(ROOT, top)
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"
                           and not os.path.islink(os.path.join(dirpath, d))]
            rel = os.path.relpath(dirpath, base)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for f in filenames:
                if f.endswith(".py"):
                    name = parts if f == "__init__.py" else parts + [f[:-3]]
                    out[".".join(name)] = os.path.join(dirpath, f)
    return out


def _imports(name, path, known):
    """The clip_fast modules ``name`` imports anywhere in its source: at import time or
    deferred into a function (a deferred import still ties the two modules together)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clip_fast"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("clip_fast"):
                continue
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in found if m != name}


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_no_import_circle():
    """No module imports a module that imports it back, however indirectly, not even through
    an import deferred into a function; a package's ``__init__`` re-exporting its own
    submodules, or a module importing its package, is not a circle."""
    graph = _graph()
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph or m.startswith(n + ".") or n.startswith(m + "."):
                continue  # a module and its own package's __init__
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_imports_nothing_above_it():
    bad = {m: sorted(d for d in deps if not d.startswith("clip_fast.core"))
           for m, deps in _graph().items() if m.startswith("clip_fast.core")}
    assert not any(bad.values()), bad


def test_kernels_import_only_the_core():
    bad = {m: sorted(d for d in deps if not d.startswith(("clip_fast.core", "clip_fast.kernels")))
           for m, deps in _graph().items() if m.startswith("clip_fast.kernels")}
    assert not any(bad.values()), bad
