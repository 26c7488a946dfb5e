"""Batches from a split: shuffling from a seeded generator, SamplePlan rows, device transfer."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from balancemm.data.base import Split
from balancemm.data.batch import Batch, SamplePlan


class Batches:
    """A sized, re-iterable sequence of :class:`Batch` over one split.

    The epoch's row order is fixed at construction (from ``generator``), so ``len`` is known for
    progress bars and the same generator state always yields the same batches.

    Args:
        split: the split to read.
        batch_size: rows per batch; the last batch is kept (``drop_last=False``) unless asked.
        shuffle: permute rows (train) or keep split order (evaluation).
        generator: the source of the permutation; required when shuffling or sampling by weight.
        plan: extra rows / sampling weights for this epoch (data-level methods).
        device: where batches are moved.
        num_workers: worker processes for splits without an in-memory fast path.
        subset: ``[K]`` split indices to draw from instead of the whole split.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        plan: SamplePlan | None = None,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        subset: Tensor | None = None,
    ) -> None:
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.num_workers = num_workers
        n_mod = len(split.modalities)
        rows = subset if subset is not None else torch.arange(len(split))
        if plan is not None and plan.weights is not None:
            if plan.weights.shape[0] != len(split):
                raise ValueError("SamplePlan.weights needs one weight per row of the split")
            drawn = torch.multinomial(plan.weights[rows].double(), rows.numel(), replacement=True, generator=generator)
            rows = rows[drawn]
        present = torch.ones(rows.numel(), n_mod, dtype=torch.bool)
        if plan is not None and plan.extra_index is not None and plan.extra_present is not None:
            rows = torch.cat([rows, plan.extra_index.long()])
            present = torch.cat([present, plan.extra_present.bool()])
        if shuffle:
            perm = torch.randperm(rows.numel(), generator=generator)
            rows, present = rows[perm], present[perm]
        self.rows, self.present = rows, present
        # Only augmenting splits consume a draw, so the shuffles of other datasets are unchanged.
        self.aug_seed: int | None = None
        if shuffle and split.augments:
            self.aug_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        n = rows.numel()
        self._len = n // batch_size if drop_last else math.ceil(n / batch_size)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        # An empty probe tells whether the split can slice stacked tensors (no per-sample collation).
        if self.split.get_batch(self.rows[:0]) is not None:
            yield from self._in_memory()
        else:
            yield from self._collated()

    def _make(self, inputs: dict[str, Tensor], label: Tensor, rows: Tensor, present: Tensor) -> Batch:
        batch = Batch(inputs, label, rows, present, self.split.modalities)
        return batch if self.device.type == "cpu" else batch.to(self.device)

    def _in_memory(self) -> Iterator[Batch]:
        for k in range(self._len):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            rows = self.rows[sl]
            inputs = self.split.get_batch(rows)
            assert inputs is not None
            yield self._make(inputs, self.split.labels[rows], rows, self.present[sl])

    def _collated(self) -> Iterator[Batch]:
        order = self.rows[: self._len * self.batch_size].tolist()  # drops the tail only if drop_last
        loader = DataLoader(
            _Rows(self.split, order, self.aug_seed),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        for k, (inputs, label, rows) in enumerate(loader):
            present = self.present[k * self.batch_size : k * self.batch_size + label.shape[0]]
            yield self._make(inputs, label, rows, present)


class _Rows(torch.utils.data.Dataset[dict[str, Any]]):
    def __init__(self, split: Split, order: list[int], aug_seed: int | None) -> None:
        self.split, self.order, self.aug_seed = split, order, aug_seed

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict[str, Any]:
        # Seed per position in the epoch: the same row drawn twice (a SamplePlan copy) is augmented twice.
        seed = None if self.aug_seed is None else self.aug_seed + k
        return self.split.load(self.order[k], seed)


def _collate(samples: list[dict[str, Any]]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    inputs = {m: torch.stack([s["inputs"][m] for s in samples]) for m in samples[0]["inputs"]}
    label = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    index = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return inputs, label, index
