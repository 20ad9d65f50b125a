"""The package's own import structure, read from the source with `ast` (nothing is imported):
no module of vramplan imports another of the project's modules by a string, and the graph of
explicit imports between vramplan modules, function-level ones included, has no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vramplan"
STRING_IMPORTERS = {"import_module", "__import__", "require", "spec_from_file_location", "find_spec", "run_module"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, tree: ast.AST, modules=MODULES) -> set[str]:
    """vramplan modules that `name` imports explicitly, at any depth (module, class or function
    level). `from a import b` counts as importing a.b when that is a module, else a. The parent
    packages Python imports implicitly on the way are not edges (every module would then depend
    on vramplan/__init__)."""
    is_package = modules.get(name, Path()).name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {name: imported_modules(name, ast.parse(path.read_text())) for name, path in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def string_imports(tree: ast.AST) -> list[str]:
    """Calls that import by name (importlib.import_module, __import__, errors.require, ...)
    whose target is a project module or cannot be read off the source. A loop variable over a
    literal tuple counts as its literals (`for m in ("torch", "peft"): require(m, ...)`)."""
    loops = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, (ast.Tuple, ast.List)):
            loops.setdefault(node.target.id, []).extend(node.iter.elts)
    # core/_errors.py `require(module, extra)` is the one helper that imports by a parameter; its
    # callers are what is checked
    helper = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "require"
              for n in ast.walk(f)}
    bad = []
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: n.lineno):
        if not node.args or id(node) in helper:
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called not in STRING_IMPORTERS:
            continue
        arg = node.args[0]
        targets = loops.get(arg.id, [arg]) if isinstance(arg, ast.Name) else [arg]
        for t in targets:
            if not (isinstance(t, ast.Constant) and isinstance(t.value, str)):
                bad.append(f"line {node.lineno}: {called}() of a name not written in the source")
            elif t.value.split(".")[0] in ("vramplan", "") or t.value.startswith("."):
                bad.append(f"line {node.lineno}: {called}({t.value!r})")
    return bad


def test_the_readers_see_what_they_should():
    """The two checks on hand-written sources: they can fail."""
    modules = {"vramplan": Path("vramplan/__init__.py"), "vramplan.a": Path("a.py"), "vramplan.b": Path("b.py"),
               "vramplan.pkg": Path("vramplan/pkg/__init__.py"), "vramplan.pkg.c": Path("c.py")}
    src_a = "import os\nfrom vramplan import b\ndef f():\n    from .pkg import c\n    import vramplan.pkg\n"
    assert imported_modules("vramplan.a", ast.parse(src_a), modules) == {"vramplan.b", "vramplan.pkg.c", "vramplan.pkg"}
    assert imported_modules("vramplan.pkg", ast.parse("from . import c\nfrom .. import a"), modules) == \
        {"vramplan.pkg.c", "vramplan.a"}
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    assert cycles({"x": {"y"}, "y": set()}) == []
    src = ("import importlib\nimportlib.import_module('vramplan.simulate')\n__import__('json')\n"
           "for m in ('torch', 'vramplan.x'):\n    require(m, 'simulate')\nimport_module(name)\n")
    assert string_imports(ast.parse(src)) == ["line 2: import_module('vramplan.simulate')",
                                              "line 5: require('vramplan.x')",
                                              "line 6: import_module() of a name not written in the source"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_project_module_is_imported_by_string(name):
    assert string_imports(ast.parse(MODULES[name].read_text())) == []


def test_the_import_graph_has_no_cycle():
    found = cycles(graph())
    edges = graph()
    detail = "; ".join(" -> ".join(f"{m} (imports {sorted(edges[m] & set(c))})" for m in c) for c in found)
    assert not found, detail
