"""The layout rules of DESIGN.md that code can check: `reasoning/` (the library) never imports `tasks/` or a stage
script, and the modules of reasoning/, tasks/ and scripts/ import each other without cycles (lazy imports inside
functions count: they are edges all the same)."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("reasoning", "tasks", "scripts")


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file."""
    modules = {f"{pkg}.{name[:-3]}": os.path.join(REPO, pkg, name)
               for pkg in PACKAGES for name in sorted(os.listdir(os.path.join(REPO, pkg))) if name.endswith(".py")}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {t for t in targets if t in modules and t != module} | \
            {t for t in targets if t.split(".")[0] in PACKAGES and t.split(".")[0] != "reasoning"
             and module.startswith("reasoning.")}
    return graph


def test_the_library_imports_no_tasks_and_no_scripts():
    graph = import_graph()
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("reasoning.")
                       for t in targets if not t.startswith("reasoning."))
    assert offenders == []


def test_no_import_cycles():
    graph = import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(graph.get(node, ()))
        return False

    cycles = sorted(f"{m} <-> {t}" for m, targets in graph.items() for t in targets if m < t and reaches(t, m))
    assert cycles == []
