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
    assert "service.distributed" in graph["service.routing"]  # ... lazy ones too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


#: The routing core (app.state.routing and its components): no HTTP in it.
CORE = ("service.routing", "service.distributed", "service.components", "service.domain",
        "service.registry", "service.policies", "service.guards", "service.decider",
        "service.ingest", "service.history", "service.checkpoints", "service.local",
        "service.spend", "service.features", "service.follower")


def test_service_core_raises_domain_errors_not_problems():
    graph = service_imports()
    # The routing core raises service.exceptions; only the HTTP layer builds problems.
    assert [m for m in CORE if "service.errors" in graph[m]] == []
    assert [m for m in CORE if any(t.startswith("service.routes") for t in graph[m])] == []
    assert {"service.registry", "service.decider", "service.ingest", "service.history",
            "service.distributed"} <= {m for m in CORE if "service.exceptions" in graph[m]}


def test_service_core_points_one_way():
    """The registry knows none of its listeners; the policy store knows no feedback sink
    and no statistics source; the decider knows neither mode."""
    graph = service_imports()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert reaches("service.registry").isdisjoint(
        {"service.policies", "service.guards", "service.decider", "service.ingest"})
    assert reaches("service.policies").isdisjoint(
        {"service.ingest", "service.checkpoints", "service.distributed", "service.decider"})
    assert reaches("service.decider").isdisjoint(
        {"service.ingest", "service.checkpoints", "service.distributed", "service.local"})
    # A mode's components know nothing of the other mode's.
    assert reaches("service.distributed").isdisjoint(
        {"service.ingest", "service.checkpoints", "service.local"})


def test_service_modules_are_small():
    sizes = {_module(p): len(p.read_text().splitlines()) for p in SERVICE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
