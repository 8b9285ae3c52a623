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
    assert "service.registry" in graph["service.policies"]  # the parser sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_service_core_points_one_way():
    graph = service_imports()
    # The registry publishes to listeners; it imports none of them.
    assert not graph["service.registry"] & {"service.policies", "service.ingest",
                                            "service.decider", "service.routing"}
    # Feedback ingest hands outcomes to the policy store, never the other way.
    assert "service.policies" in graph["service.ingest"]
    assert "service.ingest" not in graph["service.policies"]
    # The core raises domain errors; only the HTTP layer knows problem details.
    core = ("service.registry", "service.policies", "service.ingest", "service.decider",
            "service.checkpoints", "service.spend", "service.history", "service.routing",
            "service.distributed", "service.components", "service.domain")
    assert [m for m in core if "service.errors" in graph[m]] == []


def test_service_modules_are_small():
    sizes = {_module(p): len(p.read_text().splitlines()) for p in SERVICE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
