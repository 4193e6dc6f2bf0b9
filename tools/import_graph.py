"""The module import graph of ``bs_kernels`` and ``bs_train``, its cycles and its layering, read from the source.

Layers point one way (``bs_train`` imports ``bs_kernels``, never the reverse) and no module may sit on an import
circle, including circles closed by a function-level import, which Python tolerates silently until someone moves
an import to the top of a file. This script checks both without importing anything: it parses every ``.py`` file of
the packages with ``ast`` and collects every ``import`` / ``from ... import`` statement wherever it appears (module
level, inside functions and classes, under ``try`` or ``if``), resolving relative imports against the importing
module's package. An edge A -> B means "A imports B", B being the deepest project module the statement names
(``from .data import collate`` -> ``bs_train.data``; ``from . import metrics`` -> ``bs_train.metrics``;
``from bs_kernels import IGNORE_INDEX`` -> ``bs_kernels``, the package's ``__init__``). The parent packages that
Python initialises on the way are not edges: they are no circle of the importing module's making.

    python tools/import_graph.py            # one line per module (its project imports), cycles, violations, summary
    python tools/import_graph.py --json     # the same as one JSON document

Exit status: 0 when there is no cycle and no layering violation, 1 otherwise, 2 when a file cannot be parsed.
A cycle is reported as its strongly connected component, one concrete loop through it
(``bs_train.a -> bs_train.b -> bs_train.a``) and the statements that hold it together (module, line, whether
function-level); a module importing itself is a cycle of one.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bs_kernels", "bs_train")
# package -> the packages it must never import (DESIGN.md: bs_kernels depends on torch and triton only)
FORBIDDEN = {"bs_kernels": ("bs_train",)}


@dataclass(frozen=True)
class Edge:
    """One import statement between two project modules."""

    source: str  # the importing module
    target: str  # the imported module
    line: int  # line of the statement in the source's file
    local: bool  # inside a function or class body (not run at import time of the source)


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under each package folder of ``root``."""
    modules: dict[str, Path] = {}
    for package in packages:
        folder = root / package
        if not (folder / "__init__.py").is_file():
            raise ValueError(f"{folder} is not a package (no __init__.py)")
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of the tree with whether it sits inside a function or class body."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, local))
            visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                     ast.Lambda)))

    visit(tree, False)
    return found


def _deepest(name: str, modules: dict[str, Path]) -> str | None:
    """The longest dotted prefix of ``name`` that is a project module (``a.b.c`` -> ``a.b`` if only that exists)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             modules: dict[str, Path]) -> list[str]:
    """The project modules one import statement of ``module`` names (empty for third-party imports)."""
    if isinstance(node, ast.Import):
        return [t for alias in node.names if (t := _deepest(alias.name, modules)) is not None]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        if node.level - 1 >= len(package):
            raise ValueError(f"{module}: relative import beyond the top-level package (line {node.lineno})")
        base = ".".join(package[:len(package) - (node.level - 1)])
        if node.module:
            base = f"{base}.{node.module}"
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub when there is one
        target = _deepest(f"{base}.{alias.name}", modules) if alias.name != "*" else None
        target = target if target is not None and target != _deepest(base, modules) else _deepest(base, modules)
        if target is not None and target not in targets:
            targets.append(target)
    return targets


def build_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> tuple[list[str], list[Edge]]:
    """All project modules (sorted) and every import edge between them, function-level imports included.
    Raises ``SyntaxError`` naming the file when one does not parse."""
    modules = module_files(root, packages)
    edges: list[Edge] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, local in _imports(tree):
            for target in _resolve(module, path.name == "__init__.py", node, modules):
                edges.append(Edge(module, target, node.lineno, local))
    return sorted(modules), edges


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components of the graph, each sorted, in a deterministic order."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        if e.target not in succ[e.source]:
            succ[e.source].append(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth <= number of modules (tens)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in nodes:
        if v not in index:
            connect(v)
    return sorted(components)


def _loop(start: str, members: set[str], edges: list[Edge]) -> list[str]:
    """One shortest loop from ``start`` back to itself through ``members`` (self-imports left out), as a path."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        if e.source in members and e.target in members and e.source != e.target:
            succ.setdefault(e.source, set()).add(e.target)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(succ.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no loop through {start} in {sorted(members)}")


def cycles(nodes: list[str], edges: list[Edge]) -> list[dict[str, list]]:
    """Every import cycle: ``{"modules": its strongly connected component, "loops": [...]}``, the loops being one
    shortest loop through the component's first module (when it has more than one) and every self-import in it.
    A component of one module counts only when the module imports itself."""
    self_loops = {e.source for e in edges if e.source == e.target}
    found = []
    for c in strongly_connected(nodes, edges):
        loops = [_loop(c[0], set(c), edges)] if len(c) > 1 else []
        loops += [[m, m] for m in c if m in self_loops]
        if loops:
            found.append({"modules": c, "loops": loops})
    return found


def violations(edges: list[Edge], forbidden: dict[str, tuple[str, ...]] = FORBIDDEN) -> list[Edge]:
    """The edges from a package to one it must never import."""
    def top(module: str) -> str:
        return module.split(".")[0]
    return [e for e in edges if top(e.target) in forbidden.get(top(e.source), ())]


def _where(e: Edge) -> str:
    return f"{e.source} -> {e.target} (line {e.line}{', function-level' if e.local else ''})"


def report(root: Path = REPO, packages: tuple[str, ...] = PACKAGES,
           forbidden: dict[str, tuple[str, ...]] = FORBIDDEN) -> dict:
    """The graph, its cycles and its layering violations as one JSON-ready dict (``ok`` when neither is found)."""
    nodes, edges = build_graph(root, packages)
    graph = {n: sorted({e.target for e in edges if e.source == n}) for n in nodes}
    local = {n: sorted({e.target for e in edges if e.source == n and e.local}
                       - {e.target for e in edges if e.source == n and not e.local}) for n in nodes}
    found = cycles(nodes, edges)
    for c in found:  # every statement that holds the circle together, to know which import to move
        c["edges"] = [_where(e) for e in edges if e.source in c["modules"] and e.target in c["modules"]]
    bad = violations(edges, forbidden)
    return {"packages": list(packages), "modules": len(nodes), "edges": len({(e.source, e.target) for e in edges}),
            "graph": graph, "function_level_only": {n: t for n, t in local.items() if t}, "cycles": found,
            "violations": [_where(e) for e in bad], "ok": not found and not bad}


def _print_text(res: dict) -> None:
    for module, targets in res["graph"].items():
        local = set(res["function_level_only"].get(module, ()))
        named = [f"{t} (function-level)" if t in local else t for t in targets]
        print(f"{module}: {', '.join(named) if named else '-'}")
    for c in res["cycles"]:
        print(f"CYCLE among {', '.join(c['modules'])}: " + "; ".join(" -> ".join(loop) for loop in c["loops"]))
        for e in c["edges"]:
            print(f"    {e}")
    for v in res["violations"]:
        print(f"LAYERING VIOLATION {v}")
    print(f"{'OK' if res['ok'] else 'FAIL'}: {res['modules']} modules, {res['edges']} import edges, "
          f"{len(res['cycles'])} cycles, {len(res['violations'])} layering violations")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=REPO, help="folder holding the packages (default: this repository)")
    p.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated top-level packages")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the text report")
    args = p.parse_args(argv)
    try:
        res = report(args.root, tuple(args.packages.split(",")))
    except (SyntaxError, ValueError, OSError) as e:
        print(f"import_graph: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _print_text(res)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
