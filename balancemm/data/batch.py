"""The two data types every layer shares: :class:`Batch` and :class:`SamplePlan`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """A batch of multimodal samples.

    Attributes:
        inputs: modality name → input tensor ``[B, ...]``; modalities are dict keys in sorted order,
            never positions.
        label: ``[B]`` class indices.
        index: ``[B]`` indices into the split the rows came from (per-sample valuation needs them).
        present: ``[B, M]`` bool, which modalities each row carries; column ``j`` belongs to
            ``modalities[j]``. The Shapley metric, coalition passes and resampled copies all work by
            editing this mask, never by editing inputs.
        modalities: the sorted modality names that index ``present``'s columns.
        share: the fraction of the global batch these rows are, in a data-parallel run (1 on one
            process): a rank's gradient counts for this much of the global batch's.
    """

    inputs: dict[str, Tensor]
    label: Tensor
    index: Tensor
    present: Tensor
    modalities: tuple[str, ...]
    share: float = 1.0

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def with_only(self, keep: Iterable[str]) -> Batch:
        """The same rows with every modality outside ``keep`` masked out (a coalition)."""
        keep = set(keep)
        unknown = keep.difference(self.modalities)
        if unknown:
            raise KeyError(f"unknown modalities {sorted(unknown)}; batch has {self.modalities}")
        present = self.present.clone()
        for j, m in enumerate(self.modalities):
            if m not in keep:
                # fill_ with a Python scalar runs on the mask's device: no host data is copied over.
                present[:, j].fill_(False)
        return replace(self, present=present)

    def present_of(self, modality: str) -> Tensor:
        """``[B]`` bool mask of the rows that carry ``modality``."""
        return self.present[:, self.modalities.index(modality)]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {m: x.to(device, non_blocking=True) for m, x in self.inputs.items()},
            self.label.to(device, non_blocking=True),
            self.index.to(device, non_blocking=True),
            self.present.to(device, non_blocking=True),
            self.modalities,
            self.share,
        )


@dataclass(frozen=True)
class Subset:
    """One part of an epoch that a :class:`SamplePlan` replaces: rows that all carry the same modalities.

    Attributes:
        index: ``[K]`` split indices of the part's rows (duplicates allowed, ``K`` may be 0).
        present: ``[M]`` bool, the modality mask every row of the part carries.
    """

    index: Tensor
    present: Tensor

    def __post_init__(self) -> None:
        if self.index.dim() != 1:
            raise ValueError(f"a Subset's index must be one-dimensional [K], got shape {tuple(self.index.shape)}")
        if self.present.dim() != 1:
            raise ValueError(f"a Subset's present must be one mask row [M], got shape {tuple(self.present.shape)}")


@dataclass(frozen=True)
class SamplePlan:
    """How one training epoch departs from "every sample once, all modalities present".

    Returned by ``Method.on_epoch_start`` (data-level methods such as Modality-valuation and Data
    Remixing); the data layer applies it in memory, without rebuilding a dataset.

    Attributes:
        extra_index: ``[K]`` split indices of rows appended to the epoch (duplicates allowed).
        extra_present: ``[K, M]`` bool modality mask of those extra rows.
        weights: optional ``[N]`` non-negative sampling weights; when given, the epoch draws N rows
            with replacement in proportion to them instead of a permutation.
        subsets: an ordered sequence of homogeneous parts that *replaces* the epoch: the epoch is the
            first part's rows, then the second's, …, each part shuffled (when the epoch is) and batched
            on its own, so that every batch holds rows of one part and one modality mask only (a part's
            last batch may be smaller). Empty parts are skipped. It cannot be combined with extra rows
            or weights, which describe changes to the ordinary epoch.
    """

    extra_index: Tensor | None = None
    extra_present: Tensor | None = None
    weights: Tensor | None = None
    subsets: tuple[Subset, ...] | None = None

    def __post_init__(self) -> None:
        if (self.extra_index is None) != (self.extra_present is None):
            raise ValueError("extra_index and extra_present go together")
        if (
            self.extra_index is not None
            and self.extra_present is not None
            and self.extra_present.shape[0] != self.extra_index.shape[0]
        ):
            raise ValueError("extra_present needs one row per extra_index entry")
        if self.subsets is not None:
            if self.extra_index is not None or self.weights is not None:
                raise ValueError("subsets replace the epoch's rows; they cannot be combined with extra rows or weights")
            if not self.subsets:
                raise ValueError("subsets needs at least one subset (None keeps the ordinary epoch)")
            if len({s.present.shape[0] for s in self.subsets}) != 1:
                raise ValueError("every subset's present mask needs the same number of modalities")
