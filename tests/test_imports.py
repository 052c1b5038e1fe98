"""Imports inside amodal run one way (docs/design.md §2), function-level imports included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "amodal"

# Lower layers never import higher ones; within a layer, no cycles.
LAYERS = [
    ["amodal.labels", "amodal.config", "amodal.fileio", "amodal.signals", "amodal.slurm", "amodal.outcome"],
    ["amodal.data", "amodal.models", "amodal.losses", "amodal.metrics", "amodal.optim"],
    ["amodal.checkpoint", "amodal.tracking", "amodal.distributed", "amodal.requeues", "amodal.runlock",
     "amodal.preflight", "amodal.step", "amodal.bench"],
    ["amodal.train", "amodal.predict", "amodal.submission", "amodal.evaluate", "amodal.visualize", "amodal.report"],
    ["amodal.jobs"],
    ["amodal.launch", "amodal.status"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, name, set(paths)) for name, path in paths.items()}


def layer(name: str) -> int:
    for i, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"{name} has no layer in tests/test_imports.py: add it where it belongs")


def test_no_import_cycle():
    graph = import_graph()
    done, path = set(), []

    def visit(node):
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done:
            return
        path.append(node)
        for target in graph[node]:
            visit(target)
        path.pop()
        done.add(node)

    for node in graph:
        visit(node)


def test_imports_run_down_the_layers():
    upward = [f"{a} imports {b}" for a, targets in import_graph().items() for b in targets
              if a != "amodal" and b != "amodal" and layer(b) > layer(a)]
    assert not upward, "\n".join(upward)
