"""Data layer: datasets, splits, batches. Datasets register themselves on import below."""

from __future__ import annotations

from typing import Any

from balancemm.data import balanced_av as _balanced_av  # noqa: F401  (registers balanced_av)
from balancemm.data import cmu_mosei as _cmu_mosei  # noqa: F401  (registers cmu_mosei)
from balancemm.data import cremad as _cremad  # noqa: F401  (registers cremad)
from balancemm.data import embedded as _embedded  # noqa: F401  (registers embedded, embedded3)
from balancemm.data import food101 as _food101  # noqa: F401  (registers food101)
from balancemm.data import kinetics_sounds as _kinetics_sounds  # noqa: F401  (registers kinetics_sounds)
from balancemm.data import ucf101 as _ucf101  # noqa: F401  (registers ucf101)
from balancemm.data import vggsound as _vggsound  # noqa: F401  (registers vggsound)
from balancemm.data.base import SPLITS, InMemorySplit, MultimodalDataset, Split, SplitName
from balancemm.data.batch import Batch, SamplePlan
from balancemm.data.loader import Batches
from balancemm.registry import DATASETS

__all__ = [
    "DATASETS",
    "SPLITS",
    "Batch",
    "Batches",
    "InMemorySplit",
    "MultimodalDataset",
    "SamplePlan",
    "Split",
    "SplitName",
    "create_dataset",
]


def create_dataset(name: str, options: Any = None, **overrides: Any) -> MultimodalDataset:
    """Build a registered dataset by name: ``create_dataset("embedded", audio_informativeness=0.8)``.

    ``options`` is the dataset's ``Options`` instance; keyword overrides are validated like config
    keys (``None`` values are dropped, as in timm's factories).
    """
    from balancemm.schema import parse, to_dict

    cls = DATASETS.get(name)
    base = to_dict(options) if options is not None else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return cls(parse(cls.Options, base, "data"))
