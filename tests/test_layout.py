"""The run directory's layout has one owner, ``balancemm/layout.py``: no other module spells its file names,
and the report and a sweep's parent read run directories through it without importing torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from balancemm import layout

PACKAGE = Path(__file__).resolve().parents[1] / "balancemm"
OWNER = PACKAGE / "layout.py"
#: Names that can only mean a run directory's file, wherever they appear in a string as a word of their own
#: (``tokenizer_config.json`` is another file).
DISTINCT = ("config.json", "results.jsonl", "summary.json", "probe.json", "last.pt", "best.pt")
_DISTINCT = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, DISTINCT)) + r")(?![\w-])")
_LOCK = re.compile(r"\.lock(?![\w-])")  # the run's lock, or a lock file named after it
#: Every name of the layout: a path built from one of them (``x / "done"``) is a run directory's path.
NAMES = frozenset({*layout.ENTRIES, "last.pt", "best.pt", layout.LAST_CHECKPOINT, layout.BEST_CHECKPOINT})
#: (file, name) pairs that are not about run directories.
ALLOWED = {
    # A pretrained model folder's own config (Hugging Face layout), not a run's.
    ("models/encoders/base.py", "config.json"),
}


def _strings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every string constant of the code, docstrings and other bare string statements left
    out (prose)."""
    prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            yield node.lineno, node.value


def _path_parts(tree: ast.AST) -> Iterator[ast.Constant]:
    """String constants used as parts of a path: ``x / "name"``, ``x.joinpath("name")``, ``x.glob("name")``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            yield from (n for n in (node.left, node.right) if isinstance(n, ast.Constant))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"joinpath", "with_name", "glob", "rglob"}
        ):
            yield from (n for n in node.args if isinstance(n, ast.Constant))


def _offences(source: str, rel: str) -> list[str]:
    """Where the code of ``balancemm/<rel>`` spells a run directory's file name."""
    found = []
    tree = ast.parse(source, rel)
    for line, text in _strings(tree):
        names = {m.group(1) for m in _DISTINCT.finditer(text)} | set(_LOCK.findall(text))
        if any((rel, name) not in ALLOWED for name in names):
            found.append(f"balancemm/{rel}:{line}: {text!r}")
    for node in _path_parts(tree):
        if node.value in NAMES and (rel, node.value) not in ALLOWED:
            found.append(f"balancemm/{rel}:{node.lineno}: path part {node.value!r}")
    return found


def test_the_check_finds_names_in_code_and_not_in_prose() -> None:
    code = '''"""Reads summary.json and checkpoints/last.pt."""
def f(run, out, tokens):
    """The done marker, the .lock file."""
    tokens.append("tokenizer_config.json")  # another file: not a run's
    manifest = {"failed": 1, "done": 2}  # keys, not paths
    return run / "done", f"{out}/summary.json", out.parent / f".{out.name}.lock", out.rglob("config.json")
'''
    assert {line.split(": ", 1)[1] for line in _offences(code, "x.py")} == {
        "'/summary.json'",
        "'.lock'",
        "'config.json'",
        "path part 'config.json'",
        "path part 'done'",
    }


def test_no_module_but_the_layout_spells_a_run_directory_file_name() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != OWNER:
            found += _offences(path.read_text(), path.relative_to(PACKAGE).as_posix())
    assert not found, "run directory names outside balancemm/layout.py (use its constants):\n" + "\n".join(found)


def test_the_layout_names_every_file_of_a_run(tmp_path: Path) -> None:
    run = layout.RunFiles(tmp_path / "run")
    top = {p.relative_to(run.path).parts[0] for p in vars(run).values() if p != run.path}
    assert top == set(layout.ENTRIES)
    assert run.last.parent == run.best.parent == run.checkpoints
    assert layout.job_lock(run.path) == tmp_path / ".run.lock"


def test_the_report_and_a_sweep_parent_read_run_directories_without_torch() -> None:
    code = (
        "import sys\n"
        "import balancemm.layout, balancemm.files, balancemm.report\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
