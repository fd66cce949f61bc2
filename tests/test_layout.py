"""The layout rules of the design card, checked on every run: no import circles (imports
inside functions included), at most 12 modules directly in core/, no source file over 700
lines, and workflow code that imports nothing that does I/O."""

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "activities", "chains", "cli", "core", "workflows")
MAX_LINES = 700
MAX_CORE_MODULES = 12
# What workflow code may never import: I/O, clients, the database, the other layers.
FORBIDDEN_IN_WORKFLOWS = (
    "httpx",
    "sqlmodel",
    "sqlalchemy",
    "psycopg",
    "openai",
    "ollama",
    "qdrant_client",
    "trafilatura",
    "py_mini_racer",
    "core",
    "activities",
    "api",
    "cli",
)


def tracked_python() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / line for line in out.split() if (ROOT / line).exists()]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (functions included)."""
    tree = ast.parse(path.read_text())
    this = module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # The most specific project module the name denotes.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in tracked_python() if p.relative_to(ROOT).parts[0] in (*PACKAGES,)]
    files += [ROOT / "worker.py"]
    known = {module_name(p) for p in files}
    graph = {module_name(p): imported(p, known) for p in files}
    # Importing a.b.c runs a/__init__ and a/b/__init__ too, but those are empty here; a
    # package import edge is kept only when the package module has content.
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_holds_few_modules_directly() -> None:
    modules = sorted(p.name for p in (ROOT / "core").glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_CORE_MODULES, modules


def test_no_source_file_over_700_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in tracked_python()
        if "migrations/versions" not in str(p)
        and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_workflows_import_no_io() -> None:
    offenders: dict[str, list[str]] = {}
    for path in sorted((ROOT / "workflows").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN_IN_WORKFLOWS:
                    offenders.setdefault(path.name, []).append(name)
    assert offenders == {}
