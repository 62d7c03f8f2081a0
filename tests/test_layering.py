"""The import direction of the packages, read from every import statement (those inside functions too).

    cli -> deploy -> cluster -> actors -> comm, model -> kernels

``cli`` (the ``tide`` command) may import everything below it; ``deploy`` (serving) imports
``cluster`` (checkpoints, data, topologies, metrics) but never the other way; ``actors`` import
neither; ``comm`` and ``kernels`` import nothing of ours; ``model`` imports only ``kernels``.
No two modules import each other, directly or around a longer cycle (an import inside a
function counts: it is a cycle the moment both run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "deploy", "cluster", "actors", "comm", "model", "kernels")
ALLOWED = {
    "cli": {"deploy", "cluster", "actors", "comm", "model", "kernels"},
    "deploy": {"cluster", "actors", "comm", "model", "kernels"},
    "cluster": {"actors", "comm", "model", "kernels"},
    "actors": {"comm", "model", "kernels"},
    "comm": set(),
    "model": {"kernels"},
    "kernels": set(),
}


def module_name(root: Path, f: Path) -> str:
    parts = list(f.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``packages`` under ``root``."""
    return {module_name(root, f): f for p in packages if (root / p).is_dir() for f in sorted((root / p).rglob("*.py"))}


def imports(root: Path, name: str, f: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import in ``f`` that names one of ``known`` (relative imports
    resolved; ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module)."""
    tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            while t and t not in known:  # `import a.b.c` names a.b.c; a name inside a module names the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((node.lineno, t))
    return out


def violations(root: Path = ROOT, allowed=ALLOWED) -> list[str]:
    """Imports against ``allowed`` (``file:line: pkg imports mod``)."""
    known = modules(root, tuple(allowed))
    bad = []
    for name, f in known.items():
        pkg = name.split(".")[0]
        for line, target in imports(root, name, f, known):
            top = target.split(".")[0]
            if top != pkg and top not in allowed[pkg]:
                bad.append(f"{f.relative_to(root)}:{line}: {pkg} imports {target}")
    return bad


def cycles(root: Path = ROOT, packages=PACKAGES) -> list[list[str]]:
    """Every set of modules that import each other around a cycle (strongly connected components
    of the import graph with more than one module), and package-level cycles as ``["pkg:a", "pkg:b"]``."""
    known = modules(root, packages)
    graph = {n: sorted({t for _, t in imports(root, n, f, known)}) for n, f in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's algorithm, iterative enough for a few hundred modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    pkg_edges = {(a.split(".")[0], b.split(".")[0]) for a, ts in graph.items() for b in ts}
    found += [[f"pkg:{a}", f"pkg:{b}"] for a, b in sorted(pkg_edges) if a < b and (b, a) in pkg_edges]
    return found


def test_imports_follow_the_layering():
    assert violations() == []


def test_no_import_cycles():
    assert cycles() == []


def test_every_package_is_checked():
    """A new top-level package of ours must be placed in the layering, not slip past it."""
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert ours == set(PACKAGES), ours - set(PACKAGES)


# ------------------------------------------------ the checker can fail
def _tree(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in {p.parent for p in tmp.rglob("*.py")}:
        (d / "__init__.py").touch()
    return tmp


@pytest.mark.parametrize("where", ["top level", "inside a function"])
def test_checker_finds_a_planted_upward_import(tmp_path, where):
    body = "from cluster.training import trainer\n" if where == "top level" else \
        "def f():\n    from cluster.training import trainer\n    return trainer\n"
    root = _tree(tmp_path, {"model/x.py": body, "cluster/training/trainer.py": "", "actors/a.py": "",
                            "comm/c.py": "", "kernels/k.py": "", "deploy/d.py": "", "cli/m.py": ""})
    bad = violations(root)
    assert bad == [f"model/x.py:{1 if where == 'top level' else 2}: model imports cluster.training.trainer"], bad


def test_checker_finds_planted_cycles(tmp_path):
    root = _tree(tmp_path, {
        "cluster/a.py": "from . import b\n",
        "cluster/b.py": "def f():\n    from .c import g\n",
        "cluster/c.py": "import cluster.a\n",
        "deploy/d.py": "from cluster import a\n",
        "cluster/e.py": "def h():\n    import deploy.d\n",
        "model/m.py": "", "actors/x.py": "", "comm/y.py": "", "kernels/z.py": "", "cli/w.py": "",
    })
    found = cycles(root)
    assert ["cluster.a", "cluster.b", "cluster.c"] in found
    assert ["pkg:cluster", "pkg:deploy"] in found
    assert "cluster/e.py:2: cluster imports deploy.d" in violations(root)
