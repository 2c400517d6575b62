"""The package's shape: no import cycle between its modules, counting every import statement (at the top of a
module and inside functions alike, since a function-local import only hides a circle), and the data sources
apart from each other behind one entry point."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "blip3o_denoise"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (relative and absolute imports)."""
    files = {module_name(p): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = ".".join(filter(None, [base, node.module]))
                else:
                    base = node.module or ""
                # `from . import hub` imports the module hub; `from .x import name` imports x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "blip3o_denoise.train" in graph["blip3o_denoise.cli"]  # `from .train import train` inside a command
    assert "blip3o_denoise.hub" in graph["blip3o_denoise.pipeline"]  # `from . import hub`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_anywhere_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_data_sources_do_not_import_each_other():
    """Local shards/store, the converted format and the object store are separate; open.py joins them."""
    graph = import_graph()
    local = {"blip3o_denoise.data.dataset", "blip3o_denoise.data.store", "blip3o_denoise.data.seed_format"}
    remote = {f"blip3o_denoise.data.{m}" for m in ("objectstore", "engine_format", "engine_dataset", "streaming",
                                                   "random_access")}
    for m in local:
        assert not graph[m] & remote, (m, graph[m] & remote)
    for m in remote:  # the readers share dataset.py's split rule and token selection, not the local file formats
        assert not graph[m] & (local - {"blip3o_denoise.data.dataset"}), (m, graph[m] & local)
    users = [m for m, edges in graph.items() if "blip3o_denoise.data.random_access" in edges]
    assert users == ["blip3o_denoise.data.open"]  # every command reaches converted data through open_dataset
    data = PACKAGE / "data"
    for p in data.glob("*.py"):
        if p.name != "__init__.py":
            assert ast.get_docstring(ast.parse(p.read_text())), f"{p.name}: no docstring saying what it owns"
