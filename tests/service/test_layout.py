"""The shape of service/: imports point one way (no circle), and no module is a blob."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"
MAX_LINES = 500


def _module(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def service_imports() -> dict[str, set[str]]:
    """module -> the service modules it imports (anywhere in it, lazily or not)."""
    modules = {_module(p): p for p in SERVICE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            targets.update(n for n in names if n in modules and n != name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_find_cycle_reports_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_service_imports_have_no_cycle():
    graph = service_imports()
    assert "service.errors" in graph["service.app"]  # the parser sees imports
    assert "service.distributed" in graph["service.app"]  # ... lazy ones too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_service_core_raises_domain_errors_not_problems():
    graph = service_imports()
    # The routing core raises service.exceptions; only the HTTP layer builds problems.
    assert [m for m in ("service.routing", "service.distributed")
            if "service.errors" in graph[m]] == []
    assert "service.exceptions" in graph["service.routing"]


#: Modules still over the limit: issue 15's split of the routing service is not done
#: (service/routing.py). Listed so that no
#: other module grows past it unnoticed, and so that this list can only shrink.
NOT_SPLIT_YET = {"service.routing"}


def test_service_modules_are_small():
    sizes = {_module(p): len(p.read_text().splitlines()) for p in SERVICE.rglob("*.py")}
    over = {m for m, n in sizes.items() if n > MAX_LINES}
    assert over - NOT_SPLIT_YET == set(), {m: sizes[m] for m in over}
    assert NOT_SPLIT_YET <= over  # split one? take it off the list
