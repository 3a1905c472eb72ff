"""No module of the packages imports, even for types only, a module that imports it back: each
reads and tests without the other (a cycle used to tie ingest.batching to ingest.writer)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("ingest", "registry", "api", "iiot")


def imports() -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports (inside `if TYPE_CHECKING:` too)."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                named.add(node.module)
                named.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {m for m in named if m in modules and m != module}
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports from `start` back to itself, if there is one."""
    paths = [[start]]
    seen = {start}
    while paths:
        path = paths.pop()
        for module in sorted(graph[path[-1]]):
            if module == start:
                return [*path, start]
            if module not in seen:
                seen.add(module)
                paths.append([*path, module])
    return None


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = imports()
    assert "ingest.writer" in graph["ingest.kafka"]  # the walk sees what it should
    cycles = [c for m in sorted(graph) if (c := cycle_through(graph, m)) is not None]
    assert cycles == []
