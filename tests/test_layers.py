"""The package's import structure, read from the source with ``ast``: no import circles, and layers that
only import downward.

Every import counts: at module level or inside a function, under ``TYPE_CHECKING`` or not, ``import
balancemm.x`` and ``from balancemm.x import y`` alike. Importing ``balancemm.a.b`` also imports the package
``balancemm.a`` (its ``__init__``), which imports what it imports; a module inside that package is not
counted as importing it that way (Python has started it already), only when it names it
(``from balancemm.a import y`` in ``balancemm/a/b.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "balancemm"

#: Lowest first: a module imports modules of lower layers and of its own package only (siblings in one
#: layer are independent). The package root, ``balancemm/__init__.py``, only defines ``__version__`` and
#: imports its public API lazily, so it sits below everything.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("balancemm.errors",),
    ("balancemm.schema", "balancemm.files"),  # config parsing helpers; atomic and checksummed files
    ("balancemm.registry",),
    ("balancemm.catalog",),  # the torch-free catalog of names and options
    ("balancemm.config",),  # reads the catalog, never the methods, datasets or models themselves
    ("balancemm.layout",),  # the run directory's files (torch-free: the report and a sweep read it)
    ("balancemm.device", "balancemm.distributed"),  # where a run computes; which rank of how many
    ("balancemm.precision",),
    ("balancemm.data",),
    ("balancemm.models",),
    ("balancemm.metrics",),
    ("balancemm.context",),  # the run context: what a method may see and do, owned by the engine
    ("balancemm.methods",),
    ("balancemm.engine",),
    ("balancemm.report", "balancemm.sweep"),
    ("balancemm.api",),
    ("balancemm.cli",),
    ("balancemm.__main__",),
)


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name → (file, whether it is a package's ``__init__``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if init else parts)] = (path, init)
    return out


MODULES = _modules()


def _module_of(name: str) -> str | None:
    """The module ``name`` is or lies in (``balancemm.data.Batches`` → ``balancemm.data``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(module: str) -> set[str]:
    """The package's modules that importing ``module`` imports directly (see the module docstring)."""
    path, init = MODULES[module]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                anchor = (module if init else module.rpartition(".")[0]).rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            names += [f"{base}.{alias.name}" for alias in node.names]
    out = set()
    for name in names:
        if name.split(".")[0] != PACKAGE or (target := _module_of(name)) is None:
            continue
        if target != module:  # the module named, also its own package (``from balancemm.data import X``)
            out.add(target)
        parts = target.split(".")
        for k in range(1, len(parts)):  # and the packages above it, unless the importer lies in them
            # (a folder without __init__.py, such as metrics/, is a namespace package: nothing to import)
            parent = ".".join(parts[:k])
            if parent in MODULES and parent != module and not module.startswith(parent + "."):
                out.add(parent)
    return out


GRAPH = {m: _imported(m) for m in MODULES}


def _layer(module: str) -> tuple[int, str] | None:
    """(layer index, the layer entry it belongs to) of a module, or None if no layer declares it."""
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                return index, entry
    return None


def test_the_graph_sees_the_imports() -> None:
    # A check that finds nothing because it reads nothing would pass too.
    assert {"balancemm.context", "balancemm.data.loader", "balancemm.data"} <= GRAPH["balancemm.engine.trainer"]
    assert "balancemm.engine.trainer" in GRAPH["balancemm.api"]  # a function-level import
    assert "balancemm.methods.agm" in GRAPH["balancemm.methods"]  # a package imports what its __init__ does
    assert "balancemm.models" in GRAPH["balancemm.api"]  # under TYPE_CHECKING


def test_there_is_no_import_circle() -> None:
    circles: list[str] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            circles.append(" → ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        path.append(module)
        for target in sorted(GRAPH[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_every_module_belongs_to_a_layer() -> None:
    undeclared = [m for m in MODULES if m != PACKAGE and _layer(m) is None]
    assert not undeclared, f"add these modules to LAYERS: {undeclared}"


def test_the_package_root_imports_nothing_of_its_own() -> None:
    assert GRAPH[PACKAGE] == set()  # its public API is imported lazily, on first use


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != PACKAGE))
def test_layers_import_only_downward(module: str) -> None:
    own = _layer(module)
    assert own is not None
    upward = []
    for target in sorted(GRAPH[module] - {PACKAGE}):
        theirs = _layer(target)
        assert theirs is not None, target
        if theirs[1] != own[1] and theirs[0] >= own[0]:
            upward.append(f"{target} (layer {theirs[0]}, {theirs[1]})")
    assert not upward, f"{module} (layer {own[0]}, {own[1]}) imports upward or sideways: {upward}"
