"""How the package's house stands: modules, lines, the longest module and function, imports made
inside functions between the package's own modules, import cycles, and floors (the longest chain
of imports once cycles are merged). What issue notes quote before and after a restructure.

    python scripts/house_report.py [PACKAGE_DIR]   (default: aether)
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def main(package_dir: str = "aether") -> None:
    root = Path(package_dir).resolve()
    top = root.name
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root): p for p in files}
    edges: dict[str, set[str]] = defaultdict(set)
    inner_imports = []
    longest_function = (0, "")
    lines = {}
    for name, path in modules.items():
        source = path.read_text(encoding="utf-8")
        lines[name] = len(source.splitlines())
        tree = ast.parse(source)

        def targets(node, name=name, path=path) -> list[str]:
            found = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node, name, path.name == "__init__.py")
                if base is None:
                    return []
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            out = []
            for t in found:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t.split(".")[0] == top and t != name:
                    out.append(t)
            return out

        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > longest_function[0]:
                    longest_function = (length, f"{name}.{node.name}")
                for inner in ast.walk(node):
                    for t in targets(inner):
                        inner_imports.append((name, t))
        for node in ast.walk(tree):
            for t in targets(node):
                edges[name].add(t)

    # strongly connected components (Tarjan), then the longest path over the condensed graph
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    sys.setrecursionlimit(10_000)
    for v in modules:
        if v not in index:
            strong(v)
    comp_of = {v: i for i, comp in enumerate(sccs) for v in comp}
    cycles = [sorted(c) for c in sccs if len(c) > 1]
    depth: dict[int, int] = {}

    def floor(c: int) -> int:
        if c not in depth:
            below = {comp_of[w] for v in sccs[c] for w in edges.get(v, ()) if comp_of[w] != c}
            depth[c] = 1 + max((floor(b) for b in below), default=0)
        return depth[c]

    floors = max(floor(c) for c in range(len(sccs)))
    biggest = max(lines, key=lines.get)
    print(f"modules: {len(modules)} ({len([p for p in files if p.name != '__init__.py'])} files besides __init__)")
    print(f"lines: {sum(lines.values()):,}; longest module: {biggest} ({lines[biggest]} lines)")
    print(f"longest function: {longest_function[1]} ({longest_function[0]} lines)")
    print(f"imports inside functions between {top}'s modules: {len(inner_imports)}")
    print(f"import cycles: {len(cycles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cycles))
    print(f"floors: {floors}")


if __name__ == "__main__":
    main(*sys.argv[1:])
