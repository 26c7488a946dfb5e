"""The templates in docs/adding-a-method.md and docs/adding-a-dataset.md, run as written.

Each page's first Python block is a complete file. Copied into a temporary package and imported, it
registers (undone when the test ends) and trains for one epoch, so a template that lost an import or
fell behind an API fails here instead of in a new maintainer's hands.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import balancemm
from balancemm.data import DATASETS
from balancemm.methods import METHODS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def first_python_block(page: str) -> str:
    match = re.search(r"^( *)```python\n(.*?)^\1```", (DOCS / page).read_text(), re.M | re.S)
    assert match, f"{page} has no python block"
    return textwrap.dedent(match.group(2))


@pytest.fixture
def plugin_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    package = tmp_path / "plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [n for n in sys.modules if n == "plugins" or n.startswith("plugins.")]:
        del sys.modules[name]


def test_the_method_template_registers_and_trains(plugin_package: Path, tmp_path: Path) -> None:
    (plugin_package / "uni_assist.py").write_text(first_python_block("adding-a-method.md"))
    with METHODS.temporary():
        importlib.import_module("plugins.uni_assist")
        summary = balancemm.train(
            "UniAssist",
            out=tmp_path / "run",
            sets=["train.epochs=1", "train.batch_size=512", "method.lam=0.25"],
        )
    assert summary["status"] == "complete" and summary["method"] == "uni_assist"
    train = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])["train"]
    # An untrained 10-class head has CE ≈ ln 10 for every term, so each unimodal term is ≈ λ × the fused
    # one: 0.25 as set, not the default 0.5.
    for m in ("audio", "visual"):
        assert 0.2 < train[f"loss/uni_{m}"] / train["loss/fused"] < 0.3
    assert "uni_assist" not in METHODS


def test_the_dataset_template_registers_and_trains(plugin_package: Path, tmp_path: Path) -> None:
    (plugin_package / "toy_pairs.py").write_text(first_python_block("adding-a-dataset.md"))
    with DATASETS.temporary():
        importlib.import_module("plugins.toy_pairs")
        summary = balancemm.train("baseline", dataset="toy_pairs", out=tmp_path / "run", sets=["train.epochs=1"])
    assert summary["status"] == "complete" and summary["dataset"] == "toy_pairs"
    assert summary["dataset_info"] == {
        "modalities": ["audio", "visual"],
        "num_classes": 4,
        "sizes": {"test": 80, "train": 240, "val": 80},
    }
    assert "toy_pairs" not in DATASETS
