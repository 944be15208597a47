"""The import graph of the product's modules, read from the source (imports at the top, inside
functions, and through importlib/__import__ strings), and the cycles in it."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO


def imported(tree: ast.Module) -> set[str]:
    """Every module a file imports: at the top, inside functions, and through importlib/__import__ strings."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")))):
            out.add(node.args[0].value)
    return out


def module_name(path: str) -> str:
    return path[:-3].replace("/", ".").removesuffix(".__init__")


def modules(folder: Path) -> dict[str, ast.Module]:
    """Path relative to the repository -> parsed source, for every module under ``folder``."""
    return {p.relative_to(REPO).as_posix(): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(folder.rglob("*.py")) if "__pycache__" not in p.parts}


def graph(trees: dict[str, ast.Module]) -> dict[str, list[str]]:
    """Module -> the modules of ``trees`` it imports. A module's own parent packages are left out:
    Python imports them before the module whatever it says (``from pkg import sibling`` names pkg)."""
    names = {module_name(p): p for p in trees}
    return {m: sorted({i for i in imported(trees[p]) if i in names and i != m and not m.startswith(i + ".")})
            for m, p in names.items()}


def cycles(g: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: each component of two or more modules is a cycle."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return found
