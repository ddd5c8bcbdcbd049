"""The library's structure: an acyclic import graph (imports inside functions count), no Streamlit import, no
module reaching into another module's private names, no test hooks read from the environment."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "foldviz"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported foldviz module, imported name or "")}, every import statement anywhere in the file."""
    mods = _modules()
    edges: dict[str, set[tuple[str, str]]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("foldviz"):
                        edges[mod].add((a.name, ""))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node)
                if not target.startswith("foldviz"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    edges[mod].add((sub, "") if sub in mods else (target, a.name))
    return edges


def _graph() -> dict[str, set[str]]:
    """module -> the foldviz modules it imports (a submodule's implicit import of its own package is not counted)."""
    mods = _modules()
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, es in import_edges().items():
        for target, _name in es:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m and not m.startswith(target + "."):
                g[m].add(target)
    return g


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_import_graph_is_acyclic_counting_imports_inside_functions():
    cyc = _cycle(_graph())
    assert cyc is None, "import cycle: " + " -> ".join(cyc)


def test_cycle_finder_finds_a_constructed_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_another_modules_private_names():
    bad = [f"{m} imports {t}.{n}" for m, es in import_edges().items() for t, n in es
           if n.startswith("_") and t != m and not n.startswith("__")]
    assert not bad, bad


def test_library_never_imports_streamlit():
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "streamlit" for n in names), p


@pytest.mark.parametrize("word", ["FAIL_ONCE", "folding-spec"])
def test_no_test_hooks_or_unshipped_documents_in_the_library(word):
    hits = [str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py") if word in p.read_text()]
    assert not hits, hits


BENCHMARKS = PKG.parent / "benchmarks"


def _benchmark_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, foldviz module, imported name or "") of every foldviz import anywhere in a benchmark script."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, "") for a in node.names if a.name.split(".")[0] == "foldviz"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "foldviz":
            out += [(node.lineno, node.module, a.name) for a in node.names]
    return out


def _unresolved(module: str, name: str) -> str | None:
    """Why ``from module import name`` (``import module`` when name is "") fails, or None when it resolves."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return f"no module {module} ({e})"
    if not name or name == "*" or hasattr(mod, name):
        return None
    try:
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return f"{module} has no attribute or submodule {name}"
    return None


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_scripts_parse_and_their_foldviz_imports_resolve(script):
    """Benchmarks are not imported by the test suite, so a renamed engine API would otherwise break them unseen."""
    path = BENCHMARKS / script
    bad = [f"{script}:{line}: {why}" for line, module, name in _benchmark_imports(path)
           if (why := _unresolved(module, name))]
    assert not bad, bad


def test_benchmark_import_check_reports_a_missing_name():
    assert _unresolved("foldviz.kmeans", "kmeans") is None
    assert _unresolved("foldviz.lm", "corpus") is None             # a submodule counts
    assert "no attribute" in _unresolved("foldviz.kmeans", "no_such_function")
    assert "no module" in _unresolved("foldviz.no_such_module", "x")
