"""SamplePlan subsets: an epoch replaced by ordered, homogeneous parts, each shuffled and batched on its own."""

from __future__ import annotations

import pytest
import torch

from balancemm.data.base import InMemorySplit
from balancemm.data.batch import SamplePlan, Subset
from balancemm.data.loader import Batches
from balancemm.distributed import shard_bounds
from tests.conftest import TinyDataset

AUDIO = torch.tensor([True, False])
VISUAL = torch.tensor([False, True])


def _plan(*parts: tuple[list[int], torch.Tensor]) -> SamplePlan:
    return SamplePlan(subsets=tuple(Subset(torch.tensor(index, dtype=torch.long), mask) for index, mask in parts))


def test_subsets_come_in_order_each_batched_on_its_own() -> None:
    split = TinyDataset(n=12).split("train")
    plan = _plan(([5, 1, 9, 3, 7], VISUAL), ([0, 2, 4, 6, 8, 10, 11], AUDIO))
    batches = list(Batches(split, 4, plan=plan))  # unshuffled: each subset in its given order
    assert [b.index.tolist() for b in batches] == [[5, 1, 9, 3], [7], [0, 2, 4, 6], [8, 10, 11]]
    assert [b.present.tolist() for b in batches] == [
        [[False, True]] * 4,
        [[False, True]],
        *[[[True, False]] * n for n in (4, 3)],
    ]
    inputs = split.inputs["audio"]  # type: ignore[attr-defined]
    assert torch.equal(batches[1].inputs["audio"], inputs[[7]]) and torch.equal(batches[1].label, split.labels[[7]])
    assert all(b.share == 1.0 for b in batches)


def test_each_subset_is_permuted_on_its_own_from_the_generator_in_order() -> None:
    split = TinyDataset(n=12).split("train")
    first, second = torch.arange(0, 12, 2), torch.arange(1, 12, 2)
    plan = SamplePlan(
        subsets=(Subset(first, AUDIO), Subset(torch.zeros(0, dtype=torch.long), VISUAL), Subset(second, VISUAL))
    )
    got = Batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(3), plan=plan)
    # One randperm per non-empty subset, in order; the empty one draws nothing.
    g = torch.Generator().manual_seed(3)
    expected = torch.cat([first[torch.randperm(6, generator=g)], second[torch.randperm(6, generator=g)]])
    assert torch.equal(got.rows, expected)
    sizes = [len(b) for b in got]
    assert sizes == [4, 2, 4, 2]  # a subset's last batch is smaller; no batch straddles two subsets
    again = Batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(3), plan=plan)
    assert torch.equal(again.rows, got.rows)


def test_the_ordinary_shuffled_epoch_draws_the_same_numbers_as_before() -> None:
    split = TinyDataset(n=10).split("train")
    g = torch.Generator().manual_seed(7)
    b = Batches(split, 4, shuffle=True, generator=g)
    reference = torch.Generator().manual_seed(7)
    assert torch.equal(b.rows, torch.randperm(10, generator=reference))
    assert torch.equal(g.get_state(), reference.get_state())  # nothing else was drawn
    assert b._slices == [(0, 4, 1.0), (4, 8, 1.0), (8, 10, 1.0)]


def test_drop_last_drops_each_subsets_short_batch() -> None:
    split = TinyDataset(n=12).split("train")
    plan = _plan(([0, 1, 2, 3, 4], AUDIO), ([5, 6, 7], VISUAL))
    batches = list(Batches(split, 4, plan=plan, drop_last=True))
    assert [b.index.tolist() for b in batches] == [[0, 1, 2, 3]]


@pytest.mark.parametrize("shuffle", [True, False])
def test_on_ranks_every_global_batch_is_split_into_contiguous_parts(shuffle: bool) -> None:
    split = TinyDataset(n=30).split("train")
    plan = _plan((list(range(0, 19)), VISUAL), (list(range(19, 30)), AUDIO))  # 8 + 8 + 3, then 8 + 3

    def batches(shard: tuple[int, int]) -> Batches:
        return Batches(split, 8, shuffle=shuffle, generator=torch.Generator().manual_seed(1), plan=plan, shard=shard)

    whole = list(batches((0, 1)))
    ranks = [list(batches((r, 3))) for r in range(3)]
    assert [len(b) for b in whole] == [8, 8, 3, 8, 3]
    for k, batch in enumerate(whole):
        parts = [ranks[r][k] for r in range(3)]
        assert torch.equal(torch.cat([p.index for p in parts]), batch.index)
        assert torch.equal(torch.cat([p.present for p in parts]), batch.present)
        assert [len(p) for p in parts] == [b - a for a, b in (shard_bounds(len(batch), r, 3) for r in range(3))]
        assert sum(p.share for p in parts) == pytest.approx(1.0)
    assert [b.share for b in ranks[0]] == pytest.approx([3 / 8, 3 / 8, 1 / 3, 3 / 8, 1 / 3])


def test_on_ranks_a_subsets_batch_smaller_than_the_ranks_is_left_out() -> None:
    split = TinyDataset(n=12).split("train")
    plan = _plan(([0, 1, 2, 3, 4], AUDIO), ([5, 6, 7, 8, 9], VISUAL))  # 4 + 1 and 4 + 1 rows
    shards = [Batches(split, 4, shuffle=True, generator=torch.Generator(), plan=plan, shard=(r, 2)) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2] and [s.dropped for s in shards] == [2, 2]
    assert [b.present[0].tolist() for b in shards[1]] == [[True, False], [False, True]]
    assert Batches(split, 4, shuffle=True, generator=torch.Generator(), plan=plan).dropped == 0


def test_collated_path_matches_in_memory_path() -> None:
    split = TinyDataset(n=9).split("train")
    assert isinstance(split, InMemorySplit)

    class NoFastPath(InMemorySplit):
        def get_batch(self, index: torch.Tensor) -> None:  # type: ignore[override]
            return None

    slow = NoFastPath(split.inputs, split.labels)
    plan = _plan(([8, 0, 4], VISUAL), ([1, 2, 3, 5, 6, 7], AUDIO))
    fast_b = list(Batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(2), plan=plan))
    slow_b = list(Batches(slow, 4, shuffle=True, generator=torch.Generator().manual_seed(2), plan=plan))
    assert len(fast_b) == len(slow_b) == 3
    for a, b in zip(fast_b, slow_b, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.present, b.present)
        assert all(torch.equal(a.inputs[m], b.inputs[m]) for m in split.modalities)


def test_plans_with_subsets_are_checked() -> None:
    rows = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="cannot be combined"):
        SamplePlan(weights=torch.ones(4), subsets=(Subset(rows, AUDIO),))
    with pytest.raises(ValueError, match="cannot be combined"):
        SamplePlan(torch.tensor([0]), torch.tensor([[True, True]]), subsets=(Subset(rows, AUDIO),))
    with pytest.raises(ValueError, match="at least one subset"):
        SamplePlan(subsets=())
    with pytest.raises(ValueError, match="same number of modalities"):
        SamplePlan(subsets=(Subset(rows, AUDIO), Subset(rows, torch.tensor([True, False, True]))))
    with pytest.raises(ValueError, match="one-dimensional"):
        Subset(rows[None], AUDIO)
    with pytest.raises(ValueError, match="one mask row"):
        Subset(rows, AUDIO[None])
    # The existing checks hold as before.
    with pytest.raises(ValueError, match="go together"):
        SamplePlan(extra_index=rows)
    with pytest.raises(ValueError, match="one row per"):
        SamplePlan(rows, torch.ones(3, 2, dtype=torch.bool))


def test_the_loader_refuses_subsets_that_do_not_fit_the_split() -> None:
    split = TinyDataset(n=6).split("train")
    with pytest.raises(ValueError, match="3 entries"):
        Batches(
            TinyDataset(3, n=6).split("train"),
            4,
            plan=_plan(
                ([0], AUDIO),
            ),
        )
    with pytest.raises(ValueError, match="outside the split's 6 rows"):
        Batches(
            split,
            4,
            plan=_plan(
                ([0, 6], AUDIO),
            ),
        )
    with pytest.raises(ValueError, match="outside"):
        Batches(
            split,
            4,
            plan=_plan(
                ([-1], AUDIO),
            ),
        )
    with pytest.raises(ValueError, match="subset="):
        Batches(
            split,
            4,
            plan=_plan(
                ([0], AUDIO),
            ),
            subset=torch.tensor([0, 1]),
        )
    empty = Batches(
        split,
        4,
        plan=_plan(
            ([], AUDIO),
        ),
    )
    assert len(empty) == 0 and list(empty) == []
