"""The import graph keeps its layers: no cycle, and the edges (web, CLI, service) are imported by
nothing in the library."""

import ast
from pathlib import Path

import leanvgg

ROOT = Path(leanvgg.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path) -> set[str]:
    """The leanvgg modules ``path`` imports when it is imported: module level only (imports in
    functions and under ``if TYPE_CHECKING`` run later or never)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                break
            if isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                if inner.module.startswith("leanvgg"):
                    found.add(inner.module)
                    if inner.module == "leanvgg":
                        found.update(f"leanvgg.{a.name}" for a in inner.names)
            elif isinstance(inner, ast.Import):
                found.update(a.name for a in inner.names if a.name.startswith("leanvgg"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in _module_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert len(edges) > 30  # the walk found the package
    assert _cycle(edges) is None, " → ".join(_cycle(edges))


def test_a_cycle_is_found_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_edges_are_imported_by_nothing_in_the_library():
    edges = graph()
    edge_modules = ("leanvgg.cli", "leanvgg.web", "leanvgg.service", "leanvgg.__main__")
    for module, imports in edges.items():
        if module.startswith(edge_modules):
            continue
        assert not {m for m in imports if m.startswith(edge_modules)}, module


def test_runtimes_does_not_import_export_and_builder_does_not_train():
    edges = graph()
    assert "leanvgg.export" not in edges["leanvgg.runtimes"]
    assert "leanvgg.capabilities" in edges["leanvgg.runtimes"]
    assert "leanvgg.capabilities" in edges["leanvgg.export"]
    assert not {"leanvgg.finetune", "leanvgg.runtime"} & edges["leanvgg.builder"]
    assert "leanvgg.packages" in edges["leanvgg.builder"]
