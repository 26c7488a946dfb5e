"""Registry: names, aliases, metadata, and that importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from balancemm.errors import ConfigError
from balancemm.methods import GROUPS, METHODS, list_methods
from balancemm.models import ENCODERS, FUSIONS
from balancemm.registry import Registry


def test_every_method_declares_group_and_paper() -> None:
    assert {"baseline", "unimodal", "ogm_ge", "mmpareto"} <= set(list_methods())
    for entry in METHODS:
        assert entry.meta["group"] in GROUPS
        assert entry.meta["paper"]
        assert entry.name == entry.name.lower()
        module = sys.modules[entry.obj.__module__]
        assert module.__name__.startswith("balancemm.methods.")
        assert module.__doc__ and "Deviations" in module.__doc__  # one file per method, with its deviations


def test_filters_and_wildcards() -> None:
    assert set(list_methods("mm*")) == {"mmcosine", "mmpareto"}
    assert "ogm_ge" in list_methods(group="optimization") and "mmcosine" not in list_methods(group="optimization")


def test_aliases_are_case_insensitive_and_unknown_names_suggest() -> None:
    assert METHODS.resolve("ogmtrainer") == "ogm_ge"
    with pytest.raises(ConfigError, match=r"did you mean 'ogm_ge'\?"):
        METHODS.resolve("ogm_gee")


def test_registration_rules() -> None:
    reg: Registry[object] = Registry("thing")
    reg.register("a", aliases=("A1",))(object())
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("b", aliases=("a1",))(object())
    with pytest.raises(ValueError, match="lower snake case"):
        reg.register("CamelCase")


def test_encoders_and_fusions_registered() -> None:
    assert {"cnn", "resnet18"} <= set(ENCODERS.names())
    assert {"concat", "sum", "film", "gated", "shared"} <= set(FUSIONS.names())


def test_import_balancemm_does_not_import_torch_and_methods_do_not_import_sklearn() -> None:
    code = (
        "import sys, balancemm; assert 'torch' not in sys.modules, 'torch imported';"
        "import balancemm.methods; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
