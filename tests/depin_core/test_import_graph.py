"""No import cycles between the project's modules.

The graph is read from the source (``ast``), not by importing: every ``import`` / ``from … import`` of a project
module counts, at module level, inside functions and under ``if TYPE_CHECKING:`` alike (a lazy import hides a
cycle, it does not remove it). ``from pkg import sub`` depends on the submodule ``pkg.sub``; the implicit import of
a module's parent packages is not counted. A cycle is a strongly connected component of more than one module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("connectors", "depin_core", "gpu_jobs", "serving", "pipelines")

# Cycles tolerated while one is being taken apart (none today); a smaller cycle inside an entry is tolerated too,
# any other one fails. Break a cycle by moving the types both sides need, not with a lazy import.
KNOWN_CYCLES: set[frozenset[str]] = set()

# The flow side of ``pipelines``: these and every project module they can import (lazily too) call library APIs
# and print nothing; rich and typer belong to ``pipelines.cli``. (prefect itself loads rich, so the check reads
# the source rather than ``sys.modules``.)
FLOW_MODULES = (
    "pipelines.flows",
    "pipelines._tasks",
    "pipelines._steps",
    "pipelines._targets",
    "pipelines.params",
    "pipelines.results",
    "pipelines.blocks",
    "pipelines.deployments",
)
CLI_LIBRARIES = {"rich", "typer", "click"}


def modules(root: Path, packages: Iterable[str]) -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is a package ``__init__``) for every module of ``packages`` under ``root``."""
    found = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return found


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module → the project modules it imports (anywhere in its source)."""
    mods = modules(root, packages)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join([*here, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in map(resolve, targets) if t is not None and t != name)
    return graph


def imported_roots(path: Path) -> set[str]:
    """The top-level names of the absolute imports in ``path`` (anywhere in its source, lazy ones too)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def reachable(graph: dict[str, set[str]], starts: Iterable[str]) -> dict[str, str | None]:
    """Every module importing ``starts`` can load (their imports, and the packages above each one, which
    Python imports first), mapped to the module that first led to it (None for a start)."""
    via: dict[str, str | None] = dict.fromkeys(starts)
    todo = list(via)
    while todo:
        mod = todo.pop()
        parents = [".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)]
        for nxt in sorted(graph.get(mod, set()) | {p for p in parents if p in graph}):
            if nxt not in via:
                via[nxt] = mod
                todo.append(nxt)
    return via


def cli_imports(root: Path, packages: Iterable[str], starts: Iterable[str]) -> dict[str, str]:
    """Module → its import chain from ``starts``, for each module reachable from them that imports a CLI library
    (rich, typer, click) itself."""
    mods = modules(root, packages)
    via = reachable(import_graph(root, packages), starts)
    found = {}
    for mod in sorted(via):
        libs = imported_roots(mods[mod][0]) & CLI_LIBRARIES
        if libs:
            chain, step = [mod], via[mod]
            while step is not None:
                chain.append(step)
                step = via[step]
            found[mod] = f"{' <- '.join(chain)} imports {', '.join(sorted(libs))}"
    return found


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.add(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(frozenset(comp))
    return found


def _describe(comp: frozenset[str], graph: dict[str, set[str]]) -> str:
    edges = [f"{a} -> {b}" for a in sorted(comp) for b in sorted(graph[a] & comp)]
    return "{" + ", ".join(sorted(comp)) + "}: " + "; ".join(edges)


def test_no_new_import_cycle() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 100, "the packages were not found"
    new = [c for c in cycles(graph) if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, "import cycles (move the shared types into a module both sides import):\n" + "\n".join(
        _describe(c, graph) for c in new
    )


def test_the_check_finds_cycles_through_lazy_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from toy.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import thing\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import toy.a\nthing = 1\n"
    )
    (pkg / "d.py").write_text("import toy.a\n")  # imports into the cycle, is not part of it
    graph = import_graph(tmp_path, ["toy"])
    assert graph["toy.sub.b"] == {"toy.c"} and graph["toy.a"] == {"toy.sub.b"}
    assert cycles(graph) == [frozenset({"toy.a", "toy.sub.b", "toy.c"})]


def test_pipelines_uses_only_the_public_modules_of_the_other_packages() -> None:
    """The composer reaches the other packages through their public modules, never a private ``_module``."""
    graph = import_graph(ROOT, PACKAGES)
    private = sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[0] == "pipelines"
        for dep in deps
        if dep.split(".")[0] != "pipelines" and any(part.startswith("_") for part in dep.split(".")[1:])
    )
    assert private == []


def test_the_flow_modules_reach_no_cli_library() -> None:
    assert set(FLOW_MODULES) <= set(modules(ROOT, PACKAGES)), "a flow module moved: update FLOW_MODULES"
    reached = reachable(import_graph(ROOT, PACKAGES), FLOW_MODULES)
    assert {"serving.targets", "gpu_jobs.api", "connectors.dimo.ingest"} <= set(reached)  # the walk goes deep
    assert not any(m.split(".")[:2] in (["pipelines", "cli"], ["pipelines", "stack"]) for m in reached)
    found = cli_imports(ROOT, PACKAGES, FLOW_MODULES)
    assert found == {}, (
        "printing is the CLI's business (pipelines.cli); pass a callback instead:\n"
        + "\n".join(found.values())
    )


def test_the_cli_check_follows_lazy_imports_and_parent_packages(tmp_path: Path) -> None:
    pkg = tmp_path / "toy"
    (pkg / "ui").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "flow.py").write_text("from toy import steps\n")
    (pkg / "steps.py").write_text("def f():\n    from toy.ui.bar import show\n")
    (pkg / "ui" / "__init__.py").write_text("import typer\n")
    (pkg / "ui" / "bar.py").write_text("from rich.progress import Progress\n")
    (pkg / "alone.py").write_text("import rich\n")  # not reachable from the flow
    found = cli_imports(tmp_path, ["toy"], ["toy.flow"])
    assert found == {
        "toy.ui": "toy.ui <- toy.ui.bar <- toy.steps <- toy.flow imports typer",
        "toy.ui.bar": "toy.ui.bar <- toy.steps <- toy.flow imports rich",
    }
