"""G-Blending against values computed by hand from its equations (docs/methods/gblending.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import balancemm
from balancemm.methods import RunContext, create_method
from balancemm.methods.gblending import GBlending, _OneHead, blend_weights
from tests.conftest import TinyDataset, first_batch, tiny_model


def test_weights_normalise_on_a_hand_computed_example() -> None:
    # ΔG = (0.2, 0.1, 0.3), ΔO = (0.1, 0.05, 0.2) → ΔG/ΔO² = (20, 40, 7.5) → /67.5 = (0.2963, 0.5926, 0.1111)
    w = blend_weights(torch.tensor([0.2, 0.1, 0.3]), torch.tensor([0.1, 0.05, 0.2]))
    assert w is not None
    assert w.tolist() == pytest.approx([0.296296, 0.592593, 0.111111], abs=1e-6)
    # the paper's Z (Σ ΔG/(2ΔO²)) would give twice these: (0.5926, 1.1852, 0.2222)
    assert (2 * w).tolist() == pytest.approx([0.592593, 1.185185, 0.222222], abs=1e-6)


def test_identical_heads_get_equal_weights_and_more_overfitting_less_weight() -> None:
    w = blend_weights(torch.tensor([0.2, 0.2, 0.1]), torch.tensor([0.1, 0.1, 0.3]))
    assert w is not None and w[0] == w[1]
    doubled = blend_weights(torch.tensor([0.2, 0.2, 0.1]), torch.tensor([0.2, 0.1, 0.3]))
    assert doubled is not None and doubled[0] < w[0]


def test_a_head_whose_validation_loss_rose_gets_nothing() -> None:
    w = blend_weights(torch.tensor([-0.1, 0.2]), torch.tensor([0.1, 0.1]))
    assert w is not None and w.tolist() == [0.0, 1.0]
    assert blend_weights(torch.tensor([-0.1, 0.0]), torch.tensor([0.1, 0.1])) is None


def test_estimate_wires_delta_g_and_delta_o_from_the_side_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    data = TinyDataset()
    method = create_method(
        "gblending",
        tiny_model(data, unimodal_heads="linear"),
        RunContext(
            data.modalities,
            dataset=data,
            needs=GBlending.needs,
            batch_size=8,
            optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.01),
        ),
    )
    # scripted per-head losses (before, after): head → ({train, val} at N, {train, val} at N + n)
    script = {
        "audio": ({"train": 1.0, "val": 1.2}, {"train": 0.5, "val": 0.9}),  # ΔG 0.3, ΔO 0.4 − 0.2 = 0.2 → 7.5
        "visual": ({"train": 1.0, "val": 1.1}, {"train": 0.8, "val": 1.0}),  # ΔG 0.1, ΔO 0.2 − 0.1 = 0.1 → 10
        "fused": ({"train": 1.0, "val": 1.3}, {"train": 0.6, "val": 1.1}),  # ΔG 0.2, ΔO 0.5 − 0.3 = 0.2 → 5
    }
    calls: dict[str, int] = {}

    def scripted(side: Any) -> dict[str, float]:
        k = calls[side.head] = calls.get(side.head, -1) + 1
        return script[side.head][k]

    monkeypatch.setattr(method, "_losses", scripted)
    w = method.estimate(epochs=1)
    assert w is not None
    assert w.tolist() == pytest.approx([7.5 / 22.5, 10 / 22.5, 5 / 22.5], abs=1e-6)


def test_fused_weight_one_is_the_baseline_step() -> None:
    data = TinyDataset()
    gb = create_method("gblending", tiny_model(data, unimodal_heads="linear"))
    gb.weights.copy_(torch.tensor([0.0, 0.0, 1.0]))
    batch = first_batch(data)
    gb.backward(gb.losses(gb.forward(batch), batch))
    ref = tiny_model(data, unimodal_heads="linear")
    F.cross_entropy(ref(batch).logits, batch.label).backward()
    for (name, p), q in zip(gb.model.named_parameters(), ref.parameters(), strict=True):
        if name.startswith("unimodal_heads"):
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("dataset", ["embedded", "embedded3"])
def test_online_estimation_end_to_end(tmp_path: Path, dataset: str) -> None:
    s = balancemm.train("gblending", dataset, out=tmp_path / "r", sets=["train.epochs=3", "method.super_epoch=2"])
    assert s["used_validation_in_training"] is True
    heads = len(s["modalities"]) + 1
    base = balancemm.train("baseline", dataset, out=tmp_path / "b", sets=["train.epochs=3"])
    # estimates at epochs 0 and 2, each (M + 1) heads × 2 epochs of side training (forward + backward)
    side = s["flops"]["by_phase"]["gblending/estimate"]
    per_epoch = base["flops"]["total"] / 3
    assert 2 * heads * 2 * per_epoch * 0.3 < side < 2 * heads * 2 * per_epoch * 1.5
    lines = (tmp_path / "r" / "results.jsonl").read_text().splitlines()
    assert all("gblending/w_fused" in line for line in lines if '"split": "val"' in line)


def test_on_a_rank_of_two_the_side_losses_are_the_whole_splits_means(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each rank reads a part of a split; the per-row losses of every rank are gathered in split order.
    data = TinyDataset()
    method = create_method(
        "gblending",
        tiny_model(data, unimodal_heads="linear"),
        RunContext(data.modalities, dataset=data, needs=GBlending.needs),
    )
    assert isinstance(method, GBlending)
    side = _OneHead(method.model, method.ctx, "audio")
    others = torch.tensor([0.5, 1.5, 4.0])  # the losses of the rows another rank read
    gathered: list[torch.Tensor] = []

    def gather(t: torch.Tensor) -> torch.Tensor:
        gathered.append(t)
        return torch.cat([t, others])  # this rank is rank 0: its rows come first

    monkeypatch.setattr(method.ctx, "gather", gather)
    got = method._losses(side)
    for split, rows in zip(("train", "val"), gathered, strict=True):
        n = len(data.split(split))
        assert rows.shape == (n,)  # one loss per row this rank read
        method.model.eval()
        with torch.no_grad():
            batch = next(iter(method.ctx.batches(split)))
            expected = F.cross_entropy(method.model(batch).unimodal_logits["audio"], batch.label, reduction="none")
        method.model.train()
        assert got[split] == pytest.approx((float(expected.sum()) + 6.0) / (n + 3), rel=1e-6)
