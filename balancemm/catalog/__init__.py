"""The torch-free catalog of what a config may name: methods, datasets, encoders and fusions.

Importing this package fills :data:`METHOD_HPARAMS`, :data:`DATASET_OPTIONS`, :data:`ENCODER_OPTIONS` and
:data:`FUSION_NAMES` (defined in :mod:`balancemm.registry`) with the built-ins: each name with its aliases,
metadata and options dataclass. The implementations in ``methods/``, ``data/`` and ``models/`` register
under the same names and must use the catalogued dataclass (the registry checks this), so the config
that ``balancemm config`` resolves without torch is the one ``balancemm train`` runs.
"""

from __future__ import annotations

from balancemm.catalog import datasets as _datasets  # noqa: F401
from balancemm.catalog import methods as _methods  # noqa: F401
from balancemm.catalog import models as _models  # noqa: F401
from balancemm.registry import DATASET_OPTIONS, ENCODER_OPTIONS, FUSION_NAMES, METHOD_HPARAMS

__all__ = ["DATASET_OPTIONS", "ENCODER_OPTIONS", "FUSION_NAMES", "METHOD_HPARAMS"]
