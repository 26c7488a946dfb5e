"""Methods: one file each, registered by the explicit import lines below (one per file)."""

from __future__ import annotations

from typing import Any

from balancemm.context import RunContext
from balancemm.methods import agm as _agm  # noqa: F401
from balancemm.methods import amco as _amco  # noqa: F401
from balancemm.methods import aug as _aug  # noqa: F401
from balancemm.methods import baseline as _baseline  # noqa: F401
from balancemm.methods import cggm as _cggm  # noqa: F401
from balancemm.methods import cml as _cml  # noqa: F401
from balancemm.methods import dgl as _dgl  # noqa: F401
from balancemm.methods import g2d as _g2d  # noqa: F401
from balancemm.methods import gblending as _gblending  # noqa: F401
from balancemm.methods import greedy as _greedy  # noqa: F401
from balancemm.methods import inforeg as _inforeg  # noqa: F401
from balancemm.methods import lfm as _lfm  # noqa: F401
from balancemm.methods import mbsd as _mbsd  # noqa: F401
from balancemm.methods import mla as _mla  # noqa: F401
from balancemm.methods import mmcosine as _mmcosine  # noqa: F401
from balancemm.methods import mmpareto as _mmpareto  # noqa: F401
from balancemm.methods import modality_valuation as _modality_valuation  # noqa: F401
from balancemm.methods import ogm_ge as _ogm_ge  # noqa: F401
from balancemm.methods import opm as _opm  # noqa: F401
from balancemm.methods import pmr as _pmr  # noqa: F401
from balancemm.methods import reconboost as _reconboost  # noqa: F401
from balancemm.methods import relearning as _relearning  # noqa: F401
from balancemm.methods import remix as _remix  # noqa: F401
from balancemm.methods import umt as _umt  # noqa: F401
from balancemm.methods import unimodal as _unimodal  # noqa: F401
from balancemm.methods.base import Method, Needs
from balancemm.models.classifier import MultimodalClassifier
from balancemm.registry import METHOD_GROUPS, METHODS

GROUPS = METHOD_GROUPS

__all__ = ["GROUPS", "METHODS", "Method", "Needs", "RunContext", "create_method", "list_methods"]


def create_method(name: str, model: MultimodalClassifier, ctx: RunContext | None = None, **hparams: Any) -> Method:
    """Wrap ``model`` in a registered method: ``create_method("ogm_ge", model, alpha=0.5)``.

    Hyper-parameters are validated like config keys; ``None`` values are dropped (timm-style), so
    callers can pass optional overrides straight through. Without ``ctx`` the method gets a
    standalone context (seed 0) — enough for unit tests and notebooks that drive the hooks by hand.
    """
    from balancemm.schema import parse

    cls = METHODS.get(name)
    hp = parse(cls.HParams, {k: v for k, v in hparams.items() if v is not None}, "method")
    return cls(model, ctx or RunContext(model.modalities, needs=cls.needs_for(hp)), hp)


def list_methods(pattern: str = "*", group: str | None = None) -> list[str]:
    """Registered method keys, optionally filtered by wildcard and taxonomy group."""
    return METHODS.names(pattern, **({"group": group} if group else {}))
