"""Lower layers never import higher ones: every import of every module of the package, read from its source.

Imports inside functions count (a deferred import is still a dependency);
imports under ``if TYPE_CHECKING:`` do not (they exist only for annotations).
``importlib.import_module("tunnelgraph....")`` with a literal name counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

PACKAGE = "tunnelgraph"
SOURCE = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS: tuple[tuple[str, ...], ...] = (
    ("tunnelgraph.errors", "tunnelgraph.ir", "tunnelgraph.models"),
    ("tunnelgraph.frontends", "tunnelgraph.runtime", "tunnelgraph.datasets"),
    ("tunnelgraph.analysis",),
    ("tunnelgraph.rewrite",),
    ("tunnelgraph.statistics",),
    ("tunnelgraph.backends",),
    ("tunnelgraph.adapters",),
    ("tunnelgraph.equivalence",),
    (
        "tunnelgraph.api",
        "tunnelgraph.reduction",
        "tunnelgraph.testing",
        "tunnelgraph.train",
        # a deprecated alias of tunnelgraph.testing (until 0.2): it reads its names from there on first use
        "tunnelgraph.statistics.reference",
    ),
    ("tunnelgraph.experiments",),
    ("tunnelgraph.cli", "tunnelgraph.__main__", "tunnelgraph"),
)
"""Lowest first. A module may import its own layer and lower ones; an entry covers its submodules,
and the most specific entry wins. ``tunnelgraph`` alone is the package's ``__init__``."""

LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> int | None:
    """The layer of ``module``: its own entry, else its closest enclosing package's (never the root's)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYER and (prefix != PACKAGE or end == len(parts)):
            return LAYER[prefix]
    return None


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(SOURCE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks (their ``else`` stays)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """``(line, imported module)`` for every import of a tunnelgraph module in ``module``'s source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from tunnelgraph import testing`` imports the module tunnelgraph.testing
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            targets = [node.args[0].value]
        for target in dict.fromkeys(targets):
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                yield node.lineno, target


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(SOURCE.parent)}:{line}"


def test_every_module_has_a_layer() -> None:
    missing = sorted(module for module in MODULES if layer_of(module) is None)
    assert not missing, "modules missing from the layer table in tests/test_layers.py: " + ", ".join(missing)


def test_no_module_imports_a_higher_layer() -> None:
    violations = []
    for module, path in MODULES.items():
        own = layer_of(module)
        if own is None:
            continue  # reported by test_every_module_has_a_layer
        for line, target in imports(module, path):
            level = layer_of(target)
            if level is None:
                violations.append(f"{_where(path, line)}: {module} imports {target}, which has no layer")
            elif level > own:
                violations.append(
                    f"{_where(path, line)}: {module} (layer {own}) imports {target} (layer {level})"
                )
    assert not violations, "imports of a higher layer:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    "module, layer",
    [
        ("tunnelgraph", 10),
        ("tunnelgraph.experiments.demo", 9),
        ("tunnelgraph.ir.graph", 0),
        ("tunnelgraph.statistics.engine", 4),
        ("tunnelgraph.statistics.reference", 8),
        ("tunnelgraph.backends.onnx_torch", 5),
        ("tunnelgraph.adapters.onnx", 6),
        ("tunnelgraph.equivalence", 7),
        ("tunnelgraph.unknown", None),
    ],
)
def test_layer_of_takes_the_most_specific_entry(module: str, layer: int | None) -> None:
    assert layer_of(module) == layer


def test_imports_are_read_inside_functions_relative_and_not_for_type_checking(tmp_path: Path) -> None:
    source = tmp_path / "__init__.py"  # read as the package tunnelgraph.backends
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import tunnelgraph.errors, numpy\n"
        "from .. import testing\n"
        "from .onnx import apply_plan_onnx\n"
        "if TYPE_CHECKING:\n"
        "    from tunnelgraph.api import rewrite\n"
        "else:\n"
        "    from tunnelgraph import cli\n"
        "def f():\n"
        "    from ..statistics.engine import a_statistics\n"
        "    importlib.import_module('tunnelgraph.reduction')\n"
    )
    assert sorted(imports("tunnelgraph.backends", source)) == [
        (2, "tunnelgraph.errors"),
        (3, "tunnelgraph.testing"),
        (4, "tunnelgraph.backends.onnx"),
        (8, "tunnelgraph.cli"),
        (10, "tunnelgraph.statistics.engine"),
        (11, "tunnelgraph.reduction"),
    ]


STATISTICS_FLOW = (
    "tunnelgraph.statistics.capture",  # one pass over the data, recording
    "tunnelgraph.statistics.chain",  # a group's linear operators on what was recorded
    "tunnelgraph.statistics.solve",  # exact or Lanczos
    "tunnelgraph.statistics.engine",  # orchestration
)
"""The statistics package flows one way: each stage imports only the stages before it."""


def test_the_statistics_stages_import_only_the_stages_before_them() -> None:
    wrong = [
        f"{_where(MODULES[module], line)}: {module} imports {target}"
        for position, module in enumerate(STATISTICS_FLOW)
        for line, target in imports(module, MODULES[module])
        if target in STATISTICS_FLOW and STATISTICS_FLOW.index(target) >= position
    ]
    assert not wrong, "\n".join(wrong)
