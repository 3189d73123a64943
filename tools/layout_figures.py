"""Figures of the code's layout, read from the source (nothing is imported or run):

* the longest functions, and the length of each program's ``main``;
* the flags read below the programs: ``args.X`` attributes and ``getattr(args, ...)`` calls outside
  the programs (main_*.py, submitit_*.py, tools/) and the command line (config/, launch/);
* import circles: groups of modules that import each other, function-level imports included.

    python tools/layout_figures.py [TREE]      # default: this checkout; TREE: another checkout
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the programs and the command line: where parsed flags are meant to be read
FLAG_LAYER = ("config/", "launch/", "tools/", "util/cli.py", "util/flag_checks.py", "util/slurm.py")


def sources(tree: Path) -> dict[str, Path]:
    """Module name -> file of every Python file outside tests/ and virtual environments."""
    found = {}
    for p in sorted(tree.rglob("*.py")):
        rel = p.relative_to(tree)
        if rel.parts[0] in ("tests", ".venv") or "site-packages" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = p
    return found


def longest_functions(files: dict[str, Path], tree: Path, top: int) -> list[tuple[int, str]]:
    rows = []
    for p in files.values():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((n.end_lineno - n.lineno + 1, f"{p.relative_to(tree)}:{n.lineno} {n.name}"))
    return sorted(rows, reverse=True)[:top]


def main_lengths(tree: Path) -> dict[str, int]:
    out = {}
    for p in sorted(tree.glob("main_*.py")):
        for n in ast.parse(p.read_text()).body:
            if isinstance(n, ast.FunctionDef) and n.name == "main":
                out[p.name] = n.end_lineno - n.lineno + 1
    return out


def flags_read_below(files: dict[str, Path], tree: Path) -> tuple[set[str], int, set[str]]:
    """(fields read as ``args.X``, ``getattr(args, ...)`` calls, files) outside the flag layer."""
    fields, getattrs, where = set(), 0, set()
    for p in files.values():
        rel = str(p.relative_to(tree))
        if p.name.startswith(("main_", "submitit_")) or rel.startswith(FLAG_LAYER):
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "args":
                fields.add(n.attr)
                where.add(rel)
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr" and n.args
                  and isinstance(n.args[0], ast.Name) and n.args[0].id == "args"):
                getattrs += 1
                where.add(rel)
    return fields, getattrs, where


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, p in files.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    up = package.split(".") if package else []
                    up = up[:len(up) - (n.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in n.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tree", nargs="?", default=str(ROOT), help="a checkout of the project (default: this one)")
    p.add_argument("--top", type=int, default=6, help="how many of the longest functions to list")
    args = p.parse_args(argv)
    tree = Path(args.tree).resolve()
    files = sources(tree)
    print(f"{tree}: {len(files)} modules, {sum(len(f.read_text().splitlines()) for f in files.values())} lines")
    print("longest functions:")
    for n, where in longest_functions(files, tree, args.top):
        print(f"  {n:4d}  {where}")
    print("main() of each program: " + ", ".join(f"{k} {v}" for k, v in main_lengths(tree).items()))
    fields, getattrs, where = flags_read_below(files, tree)
    print(f"flags read below the programs: {len(fields)} fields, {getattrs} getattr(args, ...) calls, "
          f"in {len(where)} files {sorted(where)}")
    found = circles(import_graph(files))
    print(f"import circles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
