"""The library's layout as a specification: imports flow one way, and the library stays UI-free."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "foldviz"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("foldviz"):
        return []
    # "from . import x" names submodules; "from .m import y" names module m
    return [f"{base}.{a.name}" for a in node.names] if node.module is None else [base]


def _top_level_imports() -> dict[str, set[str]]:
    """Module -> foldviz modules it imports when it is imported (function-level imports excluded)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom):
                deps.update(d for d in _resolve(mod, node, path.name == "__init__.py") if d in files)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
        graph[mod] = deps - {mod}
    return graph


def test_no_import_cycle():
    graph = _top_level_imports()
    assert "foldviz.fold" in graph and "foldviz.methods" in graph
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_registry_and_leaf_modules_import_nothing_heavy_from_foldviz():
    graph = _top_level_imports()
    assert graph["foldviz.methods"] == set()          # anyone may import the registry
    assert "foldviz.session" not in set().union(*graph.values())   # nothing in the library depends on the app's memory


def test_no_except_importerror_around_own_modules_and_no_streamlit_in_the_library():
    """An optional third-party dependency may be guarded; foldviz's own modules always exist."""
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    h.type is not None and {n.id for n in ast.walk(h.type) if isinstance(n, ast.Name)}
                    & {"ImportError", "ModuleNotFoundError"} for h in node.handlers):
                for imp in (n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.ImportFrom)):
                    assert imp.level == 0 and not (imp.module or "").startswith("foldviz"), path
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] == "streamlit" for m in mods), path
