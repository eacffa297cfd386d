"""The package's shape: no import cycle (function-level imports included), nobody imports the
CLI, and no module over about 600 lines."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "bitnet_jax"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Package modules `tree` imports anywhere (top level or inside functions), except under
    `if TYPE_CHECKING:`. `from pkg import mod` counts as importing pkg.mod when that is one."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in MODULES and name != module}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = _imports(tree, module, path.name == "__init__.py")
    # bitnet_jax/__init__.py names modules in its lazy _EXPORTS map (strings, never imported
    # at load time) and imports only importlib: nothing to add for it.
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_from_imports():
    graph = import_graph()
    assert "bitnet_jax.interop.load" in graph["bitnet_jax.infer.generate"]
    assert "bitnet_jax.train.loop" in graph["bitnet_jax.cli"]  # imported inside a command
    assert "bitnet_jax.core.codec" in graph["bitnet_jax.interop.hf"]  # `from core import codec`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_nothing_imports_the_cli():
    importers = [m for m, targets in import_graph().items() if "bitnet_jax.cli" in targets]
    assert importers == []


def test_no_module_is_over_600_lines():
    lengths = {m: len(path.read_text().splitlines()) for m, path in MODULES.items()}
    assert {m: n for m, n in lengths.items() if n > MAX_LINES} == {}
