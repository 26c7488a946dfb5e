"""The dataset protocol: a dataset owns its train / validation / test splits and describes itself.

A split yields samples as ``{"inputs": {modality: tensor}, "label": int, "index": int}``. Splits held
entirely in memory also implement :meth:`Split.get_batch`, which the batch iterator prefers: slicing
stacked tensors is far cheaper than collating samples one by one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "test")


class Split(Dataset[dict[str, Any]], ABC):
    """One split of a dataset.

    A split with random training augmentation sets ``augments = True`` and implements :meth:`load`;
    the batch iterator then hands it one seed per row, drawn from the run's generator, so augmented
    epochs are reproducible whatever the number of loader workers.
    """

    modalities: tuple[str, ...]
    labels: Tensor  # [N] class indices
    augments: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abstractmethod
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    def load(self, i: int, seed: int | None) -> dict[str, Any]:
        """Row ``i``, augmented from ``seed`` (None: the deterministic evaluation view)."""
        return self[i]

    def get_batch(self, index: Tensor) -> dict[str, Tensor] | None:
        """Inputs of the rows ``index`` as ``{modality: [B, ...]}``, or None (no fast path)."""
        return None


class InMemorySplit(Split):
    """A split whose inputs are stacked tensors ``{modality: [N, ...]}``."""

    def __init__(self, inputs: Mapping[str, Tensor], labels: Tensor) -> None:
        self.modalities = tuple(sorted(inputs))
        self.inputs = {m: inputs[m] for m in self.modalities}
        self.labels = labels.long()
        for m, x in self.inputs.items():
            if x.shape[0] != self.labels.shape[0]:
                raise ValueError(f"{m}: {x.shape[0]} rows but {self.labels.shape[0]} labels")

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": {m: x[i] for m, x in self.inputs.items()}, "label": int(self.labels[i]), "index": i}

    def get_batch(self, index: Tensor) -> dict[str, Tensor]:
        return {m: x[index] for m, x in self.inputs.items()}


class MultimodalDataset(ABC):
    """Base class of registered datasets.

    Subclasses declare ``Options`` (a frozen dataclass validated from the config's ``data:`` section),
    build their splits in ``__init__`` and never expose the test split to methods: only the trainer
    asks for it, once, after model selection.
    """

    Options: ClassVar[type]
    name: ClassVar[str]

    modalities: tuple[str, ...]
    num_classes: int
    class_names: tuple[str, ...]
    input_shapes: dict[str, tuple[int, ...]]  # per-sample input shape of each modality

    @abstractmethod
    def split(self, name: SplitName) -> Split: ...

    def eval_subsets(self, split: SplitName) -> dict[str, Tensor]:
        """Named row subsets of ``split`` also scored at test time (e.g. CMU-MOSEI's non-zero Acc-2):
        ``{name: [K] row indices}``; none by default."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Facts recorded in every run's summary: sizes, modalities, classes."""
        return {
            "modalities": list(self.modalities),
            "num_classes": self.num_classes,
            "sizes": {s: len(self.split(s)) for s in SPLITS},
        }


def stratified_split(labels: Tensor, fractions: tuple[float, ...], generator: torch.Generator) -> list[Tensor]:
    """Split row indices into len(fractions) parts, class by class, in the given proportions.

    Args:
        labels: ``[N]`` class indices.
        fractions: proportions summing to 1 (the last part takes the rounding remainder).
    Returns:
        one sorted ``[N_k]`` index tensor per part.
    """
    parts: list[list[Tensor]] = [[] for _ in fractions]
    for c in torch.unique(labels):
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        start = 0
        for k, frac in enumerate(fractions):
            stop = rows.numel() if k == len(fractions) - 1 else start + round(frac * rows.numel())
            parts[k].append(rows[start:stop])
            start = stop
    return [torch.sort(torch.cat(p)).values for p in parts]
