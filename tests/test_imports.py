"""The import rule (docs/design.md, "The import rule"): no import cycles among nfcv's modules and
no upward imports between its layers, read statically from the source with `ast` (every
``import x`` and ``from x import y``, at module level or inside a function).

An import names the module it loads: ``from nfcv.flows import Bijector`` depends on the package
``nfcv.flows`` (its ``__init__`` and the re-exports made there), ``from nfcv.flows import base``
and ``import nfcv.flows.base`` on ``nfcv.flows.base``. Python also runs every parent package's
``__init__`` first; that is not counted as an edge, or every module would depend on
``nfcv/__init__.py``. So a package's ``__init__`` importing its own submodules is fine, and a
submodule importing its package's re-exports while the ``__init__`` imports it is a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import nfcv

PACKAGE = Path(nfcv.__file__).resolve().parent

# Layers, top to bottom, by module prefix; a module belongs to the first layer with a prefix of
# its name. `forbidden`: prefixes it may not import; `only`: all it may import (nfcv modules).
CLI = ("nfcv.cli",)
TRAINING = ("nfcv.training",)
MIDDLE = (
    "nfcv.checkpoint",
    "nfcv.config",
    "nfcv.model",
    "nfcv.data",
    "nfcv.evaluate",
    "nfcv.grid",
    "nfcv.dequant",
    "nfcv.catalogue",
    "nfcv.schema",
    "nfcv.registry",
)
MODEL_SIDE = ("nfcv.model", "nfcv.flows", "nfcv.checkpoint", "nfcv.config")
RULES: list[tuple[tuple[str, ...], dict]] = [
    (CLI, {"forbidden": (), "top_level": True}),  # the commands may use the public API
    (TRAINING, {"forbidden": CLI}),
    (("nfcv.data",), {"forbidden": CLI + TRAINING + MODEL_SIDE}),
    (MIDDLE, {"forbidden": CLI + TRAINING}),
    (("nfcv.flows",), {"only": ("nfcv.flows", "nfcv.errors")}),
    (("nfcv.errors",), {"only": ()}),
]

# Known violations, as (importing module, imported module): to fix, then delete the line here.
# The test fails on a violation not listed and on a listed one that is gone.
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts
    }


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str, str]]:
    """(line, statement, nfcv module it loads) for every nfcv import in the file."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]  # the package of relative imports
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "nfcv" or alias.name.startswith("nfcv."):
                    found.append((node.lineno, f"import {alias.name}", alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "nfcv" and not source.startswith("nfcv."):
                continue
            dots = "." * node.level
            for alias in node.names:
                statement = f"from {dots}{node.module or ''} import {alias.name}"
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.append((node.lineno, statement, submodule))
                elif (source, alias.name) == ("nfcv", "__version__"):
                    continue  # the one top-level name the layers below may read
                else:
                    found.append((node.lineno, statement, source))
    return found


MODULES = _modules()
IMPORTS = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


def _where(module: str, target: str) -> str:
    lines = [f"{line}: {stmt}" for line, stmt, t in IMPORTS[module] if t == target]
    return f"{MODULES[module].relative_to(PACKAGE.parent)} ({'; '.join(lines)})"


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _rule(module: str) -> dict | None:
    return next((rule for prefixes, rule in RULES if _under(module, prefixes)), None)


def test_every_import_of_nfcv_names_a_module_that_exists():
    """Guards the walk below: an import it resolved wrong would make every check pass."""
    for module, imports in IMPORTS.items():
        for line, statement, target in imports:
            assert target in MODULES, f"{MODULES[module]}:{line}: {statement} -> {target}?"
    assert sum(len(imports) for imports in IMPORTS.values()) > len(MODULES)


def test_every_module_has_a_layer():
    """A new top-level module must be placed in a layer above (and in docs/design.md)."""
    for module in MODULES:
        if module != "nfcv":
            assert _rule(module) is not None, f"{module} is in no layer of tests/test_imports.py"


def _upward() -> dict[tuple[str, str], str]:
    found = {}
    for module, imports in IMPORTS.items():
        rule = _rule(module)
        if rule is None:  # nfcv/__init__.py re-exports the API: it may import anything
            continue
        for _, _, target in imports:
            if target == "nfcv":  # top-level names: below cli only `from nfcv import __version__`
                bad = not rule.get("top_level", False)
            elif "only" in rule:
                bad = not _under(target, rule["only"])
            else:
                bad = _under(target, rule["forbidden"])
            if bad:
                found[(module, target)] = _where(module, target)
    return found


def test_no_upward_imports():
    found = _upward()
    new = {edge: where for edge, where in found.items() if edge not in ALLOWED_UPWARD}
    assert not new, "upward imports:\n" + "\n".join(
        f"{a} -> {b}: {w}" for (a, b), w in new.items()
    )
    gone = ALLOWED_UPWARD - set(found)
    assert not gone, f"fixed: delete these from ALLOWED_UPWARD: {sorted(gone)}"


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import)."""
    graph: dict[str, list[str]] = {m: [] for m in MODULES}
    for a, b in edges:
        graph[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycles():
    edges = {(m, t) for m, imports in IMPORTS.items() for _, _, t in imports}
    unknown = ALLOWED_CYCLE_EDGES - edges
    assert not unknown, f"fixed: delete these from ALLOWED_CYCLE_EDGES: {sorted(unknown)}"
    cycles = _cycles(edges - ALLOWED_CYCLE_EDGES)
    report = []
    for component in cycles:
        inside = sorted((a, b) for a, b in edges if a in component and b in component)
        report.append("\n".join(f"  {a} -> {b}: {_where(a, b)}" for a, b in inside))
    assert not cycles, "import cycles:\n" + "\n\n".join(report)
    # Each allowed edge must still close a cycle, or it is no longer a violation.
    for edge in ALLOWED_CYCLE_EDGES:
        closing = _cycles(edges - (ALLOWED_CYCLE_EDGES - {edge}))
        assert any(edge[0] in c and edge[1] in c for c in closing), (
            f"{edge} closes no cycle now: delete it from ALLOWED_CYCLE_EDGES"
        )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from nfcv.flows import Bijector", "nfcv.flows"),
        ("from nfcv.flows import base", "nfcv.flows.base"),
        ("import nfcv.flows.base", "nfcv.flows.base"),
        ("from . import base", "nfcv.flows.base"),
        ("from .base import Bijector", "nfcv.flows.base"),
        ("from .. import errors", "nfcv.errors"),
        ("def f():\n    from nfcv.model import ImageFlow", "nfcv.model"),
        ("from nfcv import compose", "nfcv"),
    ],
)
def test_the_walk_reads_each_form_of_import(tmp_path, source, expected):
    path = tmp_path / "mod.py"
    path.write_text(source + "\n")
    assert [t for _, _, t in _imports("nfcv.flows.mod", path, MODULES)] == [expected]


def test_the_walk_lets_the_version_through(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("from nfcv import __version__\n")
    assert _imports("nfcv.flows.mod", path, MODULES) == []


def test_the_checks_find_a_planted_violation(monkeypatch):
    """A flows module reading its package's re-exports closes a cycle with flows/__init__.py,
    and one importing the model is an upward import: both are found."""
    planted = dict(IMPORTS)
    planted["nfcv.flows.base"] = [
        (1, "from nfcv.flows import Bijector", "nfcv.flows"),
        (2, "from nfcv.model import ImageFlow", "nfcv.model"),
    ]
    monkeypatch.setattr(sys.modules[__name__], "IMPORTS", planted)
    assert ("nfcv.flows.base", "nfcv.model") in _upward()
    edges = {(m, t) for m, imports in planted.items() for _, _, t in imports}
    assert any({"nfcv.flows", "nfcv.flows.base"} <= set(c) for c in _cycles(edges))
