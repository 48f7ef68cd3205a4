"""Imports run one way and files do one job (docs/DESIGN.md section 8).

The import graph of afkern's modules (``afkern/`` and ``kernels/``, installed as
``afkern.kernels``) is read from the sources with ``ast``: every import, at module level or inside
a function (a lazy import to dodge a circle is still a circle), resolved to the afkern module it
names. The graph must have no cycle; ``kernels/`` imports nothing above ``afkern.ops``; no source
file in ``afkern/`` or ``kernels/`` is over 600 lines.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = {"afkern": os.path.join(ROOT, "afkern"), "afkern.kernels": os.path.join(ROOT, "kernels")}
MAX_LINES = 600


def _modules() -> Dict[str, str]:
    """{dotted module name: source path} of every afkern module."""
    out = {}
    for pkg, top in TREES.items():
        for dirpath, _, files in os.walk(top):
            if "__pycache__" in dirpath:
                continue
            rel = os.path.relpath(dirpath, top)
            base = pkg if rel == "." else f"{pkg}.{rel.replace(os.sep, '.')}"
            for f in files:
                if f.endswith(".py"):
                    out[base if f == "__init__.py" else f"{base}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, known: Set[str]) -> Set[str]:
    """The afkern modules that module ``name`` imports anywhere in its source."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    found: Set[str] = set()

    def add(target: str):
        # the longest known module prefix of what is imported ("afkern.ops.layer.fusion_layer" -> afkern.ops.layer)
        parts = target.split(".")
        for k in range(len(parts), 0, -1):
            cand = ".".join(parts[:k])
            if cand in known:
                if cand != name:
                    found.add(cand)
                return

    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return found


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The reader sees the imports that are there (a test that cannot fail is a defect)."""
    g = _graph()
    assert "afkern.ops.layer" in g["afkern.backends.torch_ops"]
    assert "afkern.compiler" in g["afkern.block"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles among afkern's modules (function-level imports count): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_kernels_import_nothing_above_ops():
    bad = {m: sorted(t for t in ts if not t.startswith(("afkern.kernels", "afkern.ops")))
           for m, ts in _graph().items() if m.startswith("afkern.kernels")}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"kernels/ may import only afkern.ops and itself: {bad}"


def test_no_source_file_over_600_lines():
    long = {p: n for p in _modules().values() for n in [sum(1 for _ in open(p))] if n > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
