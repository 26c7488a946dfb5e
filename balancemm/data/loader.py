"""Batches from a split: shuffling from a seeded generator, SamplePlan rows and subsets, device transfer.

What keeps a GPU busy, without changing a single number (every path yields the same batches):

* splits with a fast path (stacked tensors) that fit are copied to the device once and sliced there
  (:func:`resident`), so training on them makes no host-to-device copy at all;
* other splits are read by DataLoader workers that persist across epochs (``persistent=True``; the
  run closes them with :func:`close_loaders`): one pool per split, fed each epoch's batches through a
  batch sampler, with the default prefetch of two batches per worker and pinned memory on a GPU;
* on a GPU the next batch is copied on a side stream while the current one is computed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from balancemm.data.base import Split
from balancemm.data.batch import Batch, SamplePlan, Subset
from balancemm.distributed import shard_bounds

# A split is kept on a device while all resident splits together take at most this share of its memory.
RESIDENT_SHARE = 0.25
_resident: weakref.WeakKeyDictionary[Split, dict[torch.device, tuple[dict[str, Tensor], Tensor]]] = (
    weakref.WeakKeyDictionary()
)
_pools: weakref.WeakKeyDictionary[Split, list[_Pooled]] = weakref.WeakKeyDictionary()


def _device_budget(device: torch.device) -> int:
    """Bytes that resident splits may take on ``device``."""
    total = torch.cuda.get_device_properties(device).total_memory
    used = sum(
        x.numel() * x.element_size()
        for per_device in _resident.values()
        for d, (inputs, _) in per_device.items()
        if d == device
        for x in inputs.values()
    )
    return int(RESIDENT_SHARE * total) - used


def resident(split: Split, device: torch.device, budget: int | None = None) -> tuple[dict[str, Tensor], Tensor] | None:
    """The inputs ``{m: [N, ...]}`` and labels ``[N]`` of a whole split on ``device``, or None.

    None when the split has no fast path (per-sample loading) or when it does not fit in ``budget``
    bytes (default on a GPU: :data:`RESIDENT_SHARE` of its memory, less what other resident splits
    hold; no limit elsewhere). The copy is made once and kept for as long as the split lives.
    """
    cached = _resident.get(split, {}).get(device)
    if cached is not None:
        return cached
    one = split.get_batch(torch.arange(min(len(split), 1)))
    if one is None:
        return None
    if budget is None and device.type == "cuda":
        budget = _device_budget(device)
    size = len(split) * sum(x[:1].numel() * x.element_size() for x in one.values())
    if budget is not None and size > budget:
        return None
    inputs = split.get_batch(torch.arange(len(split)))
    assert inputs is not None
    held = ({m: x.to(device) for m, x in inputs.items()}, split.labels.to(device))
    _resident.setdefault(split, {})[device] = held
    return held


def close_loaders(splits: list[Split]) -> None:
    """Stop the persistent loader workers of ``splits`` (the trainer calls it when a run ends)."""
    for split in splits:
        _pools.pop(split, None)


class Batches:
    """A sized, re-iterable sequence of :class:`Batch` over one split.

    The epoch's row order is fixed at construction (from ``generator``), so ``len`` is known for
    progress bars and the same generator state always yields the same batches.

    Args:
        split: the split to read.
        batch_size: rows per batch; the last batch is kept (``drop_last=False``) unless asked.
        shuffle: permute rows (train) or keep split order (evaluation).
        generator: the source of the permutation; required when shuffling or sampling by weight.
        plan: extra rows / sampling weights for this epoch, or the ordered subsets that replace it
            (data-level methods; see :class:`~balancemm.data.batch.SamplePlan`).
        device: where batches are moved.
        num_workers: worker processes for splits without an in-memory fast path.
        subset: ``[K]`` split indices to draw from instead of the whole split.
        persistent: keep the worker processes for the next epoch (a run's loaders; see the module).
        shard: ``(rank, ranks)`` of a data-parallel run: this rank reads only its rows. Shuffled batches
            (training) are global batches of ``batch_size`` of which each rank takes one contiguous part,
            so the ranks' parts together are the one-process batch; a last global batch with fewer rows
            than ranks is left out on every rank (:attr:`dropped`), since a rank cannot step on no rows.
            Unshuffled passes (evaluation, statistics) give each rank one contiguous part of the rows,
            read in batches of its own; gathered in rank order they are the split in order. A plan's
            subsets are training epochs: their batches are global batches, split as the shuffled ones
            (shuffled or not), so every rank reads the same subset at the same step.
        observer: called with each batch as it is handed out (the run context keeps its share).
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
        persistent: bool = False,
        shard: tuple[int, int] = (0, 1),
        observer: Callable[[Batch], None] | None = None,
    ) -> None:
        self.split = split
        self.observer = observer
        self.persistent = persistent
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.num_workers = num_workers
        n_mod = len(split.modalities)
        rank, ranks = shard
        if plan is not None and plan.subsets is not None:
            if subset is not None:
                raise ValueError("a SamplePlan with subsets replaces the epoch's rows; it cannot be read with subset=")
            rows, present, segments = _subset_rows(plan.subsets, len(split), n_mod, shuffle, generator)
            global_batches = ranks > 1  # each batch one subset's: a global batch, split as the shuffled ones
        else:
            rows = subset if subset is not None else torch.arange(len(split))
            if plan is not None and plan.weights is not None:
                if plan.weights.shape[0] != len(split):
                    raise ValueError("SamplePlan.weights needs one weight per row of the split")
                drawn = torch.multinomial(
                    plan.weights[rows].double(), rows.numel(), replacement=True, generator=generator
                )
                rows = rows[drawn]
            present = torch.ones(rows.numel(), n_mod, dtype=torch.bool)
            if plan is not None and plan.extra_index is not None and plan.extra_present is not None:
                rows = torch.cat([rows, plan.extra_index.long()])
                present = torch.cat([present, plan.extra_present.bool()])
            if shuffle:
                perm = torch.randperm(rows.numel(), generator=generator)
                rows, present = rows[perm], present[perm]
            if not shuffle and ranks > 1:
                start, end = shard_bounds(rows.numel(), rank, ranks)
                rows, present = rows[start:end], present[start:end]
            segments = [(0, rows.numel())]
            global_batches = shuffle and ranks > 1
        self.rows, self.present = rows, present
        # Only augmenting splits consume a draw, so the shuffles of other datasets are unchanged.
        self.aug_seed: int | None = None
        if shuffle and split.augments:
            self.aug_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        #: (start, end, share) of each batch this rank reads, in positions of ``rows``.
        self._slices: list[tuple[int, int, float]] = []
        self.dropped = 0  # rows of last global batches too small to give every rank one
        for first, last in segments:  # batches never straddle two segments (a plan's subsets)
            n = last - first
            count = n // batch_size if drop_last else math.ceil(n / batch_size)
            for k in range(count):
                lo, hi = first + k * batch_size, first + min((k + 1) * batch_size, n)
                if not global_batches:
                    self._slices.append((lo, hi, 1.0))
                elif hi - lo < ranks:
                    self.dropped += hi - lo
                else:
                    a, b = shard_bounds(hi - lo, rank, ranks)
                    self._slices.append((lo + a, lo + b, (b - a) / (hi - lo)))
        self._len = len(self._slices)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        if self.observer is None:
            yield from self._batches()
            return
        for batch in self._batches():
            self.observer(batch)
            yield batch

    def _batches(self) -> Iterator[Batch]:
        # An empty probe tells whether the split can slice stacked tensors (no per-sample collation).
        if self.split.get_batch(self.rows[:0]) is not None:
            held = resident(self.split, self.device) if self.device.type != "cpu" else None
            if held is not None:
                yield from self._resident(*held)
                return
            source = self._in_memory()
        else:
            source = self._collated()
        yield from self._to_device(source)

    def _resident(self, inputs: dict[str, Tensor], labels: Tensor) -> Iterator[Batch]:
        # One small copy per epoch (the order and the mask); every batch is then sliced on the device.
        rows, present = self.rows.to(self.device), self.present.to(self.device)
        for lo, hi, share in self._slices:
            index = rows[lo:hi]
            yield Batch(
                {m: x[index] for m, x in inputs.items()},
                labels[index],
                index,
                present[lo:hi],
                self.split.modalities,
                share,
            )

    def _in_memory(self) -> Iterator[Batch]:
        for lo, hi, share in self._slices:
            rows = self.rows[lo:hi]
            inputs = self.split.get_batch(rows)
            assert inputs is not None
            yield Batch(inputs, self.split.labels[rows], rows, self.present[lo:hi], self.split.modalities, share)

    def _collated(self) -> Iterator[Batch]:
        order = self.rows.tolist()
        # Seed per position in the epoch: the same row drawn twice (a SamplePlan copy) is augmented twice.
        keys = [(row, None if self.aug_seed is None else self.aug_seed + k) for k, row in enumerate(order)]
        pooled = self._loader()
        pooled.feed.batches = [keys[lo:hi] for lo, hi, _ in self._slices]
        try:
            for (lo, hi, share), (inputs, label, rows) in zip(self._slices, pooled.loader, strict=True):
                yield Batch(inputs, label, rows, self.present[lo:hi], self.split.modalities, share)
        finally:
            pooled.busy = False

    def _loader(self) -> _Pooled:
        """A loader for this split: a free one of its persistent pool, or a new one."""
        pin = self.device.type == "cuda"
        if not (self.persistent and self.num_workers > 0):
            return _Pooled.new(self.split, self.num_workers, pin, persistent=False)
        pool = _pools.setdefault(self.split, [])
        # A method may read a split while an epoch of it is being read (a loader serves one reader).
        pooled = next((p for p in pool if not p.busy and p.key == (self.num_workers, pin)), None)
        if pooled is None:
            pooled = _Pooled.new(self.split, self.num_workers, pin, persistent=True)
            pool.append(pooled)
        pooled.busy = True
        return pooled

    def _to_device(self, source: Iterator[Batch]) -> Iterator[Batch]:
        if self.device.type == "cpu":
            yield from source
        elif self.device.type != "cuda":
            yield from (b.to(self.device) for b in source)
        else:
            yield from _prefetched(source, self.device)


def _subset_rows(
    subsets: tuple[Subset, ...], size: int, num_modalities: int, shuffle: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """The rows ``[K]`` and masks ``[K, M]`` of a plan's subsets, one after the other, each permuted on its
    own when ``shuffle`` (in subset order, one draw per non-empty subset), and each subset's
    ``(start, end)`` positions in them.

    Raises:
        ValueError: a mask without one entry per modality, or an index outside the split's ``size`` rows.
    """
    rows, present, segments, start = [], [], [], 0
    for part in subsets:
        if part.present.shape[0] != num_modalities:
            raise ValueError(f"a SamplePlan subset's present mask needs {num_modalities} entries, one per modality")
        index = part.index.long()
        if index.numel() == 0:
            continue
        if int(index.min()) < 0 or int(index.max()) >= size:
            raise ValueError(f"a SamplePlan subset holds an index outside the split's {size} rows")
        if shuffle:
            index = index[torch.randperm(index.numel(), generator=generator)]
        rows.append(index)
        present.append(part.present.bool().expand(index.numel(), num_modalities))
        segments.append((start, start + index.numel()))
        start += index.numel()
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, num_modalities, dtype=torch.bool), []
    return torch.cat(rows), torch.cat(present), segments


def _prefetched(source: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """Batches on a GPU, each copied on a side stream while the previous one is being computed."""
    stream = torch.cuda.Stream(device)
    pending: tuple[Batch, torch.cuda.Event] | None = None
    for batch in source:
        with torch.cuda.stream(stream):
            copied = (batch.to(device), stream.record_event())
        if pending is not None:
            yield _ready(*pending, device)
        pending = copied
    if pending is not None:
        yield _ready(*pending, device)


def _ready(batch: Batch, copied: torch.cuda.Event, device: torch.device) -> Batch:
    current = torch.cuda.current_stream(device)
    current.wait_event(copied)
    # The tensors were allocated on the side stream; tell the allocator the compute stream uses them.
    for t in (*batch.inputs.values(), batch.label, batch.index, batch.present):
        t.record_stream(current)
    return batch


class _Feed(Sampler[list[tuple[int, int | None]]]):
    """The batch sampler of a pooled loader: the batches of the epoch being read, as (row, seed) keys."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Keyed(torch.utils.data.Dataset[dict[str, Any]]):
    """A split read by (row, augmentation seed) keys."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int | None]) -> dict[str, Any]:
        return self.split.load(*key)


@dataclass
class _Pooled:
    loader: DataLoader[dict[str, Any]]
    feed: _Feed
    key: tuple[int, bool]  # (workers, pinned)
    busy: bool = field(default=False)

    @classmethod
    def new(cls, split: Split, workers: int, pin: bool, *, persistent: bool) -> _Pooled:
        feed = _Feed()
        loader = DataLoader(
            _Keyed(split),
            batch_sampler=feed,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=pin,
            persistent_workers=persistent,
        )
        return cls(loader, feed, (workers, pin))


def _collate(samples: list[dict[str, Any]]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    inputs = {m: torch.stack([s["inputs"][m] for s in samples]) for m in samples[0]["inputs"]}
    label = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    index = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return inputs, label, index
