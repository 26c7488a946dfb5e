"""BalanceMM: a toolkit and benchmark for multimodal imbalance learning.

Public API (imported lazily, so ``import balancemm`` stays light and the report layer never pulls
in torch): :func:`train`, :func:`resolve_config`, :func:`create_model`, :func:`create_method`,
:func:`create_dataset`, :func:`list_methods`, :func:`list_datasets`, :func:`evaluate`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "balancemm.api",
    "create_model": "balancemm.api",
    "list_datasets": "balancemm.api",
    "resolve_config": "balancemm.config",
    "create_method": "balancemm.methods",
    "list_methods": "balancemm.methods",
    "create_dataset": "balancemm.data",
    "evaluate": "balancemm.engine.evaluate",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'balancemm' has no attribute {name!r}")
