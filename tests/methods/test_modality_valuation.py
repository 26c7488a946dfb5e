"""Modality valuation against numbers computed by hand from its equations (docs/methods/modality_valuation.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import balancemm
from balancemm.data.batch import Batch
from balancemm.methods.modality_valuation import (
    ModalityValuation,
    copies_per_sample,
    resample_fraction,
    sample_values,
)
from balancemm.metrics.shapley import coalitions
from tests.conftest import TinyDataset, build_method, first_batch

A, V, AV = frozenset({"audio"}), frozenset({"visual"}), frozenset({"audio", "visual"})
MODS = ("audio", "visual")


def _phi(a: bool, v: bool, av: bool) -> tuple[float, float]:
    phi = sample_values({A: torch.tensor([a]), V: torch.tensor([v]), AV: torch.tensor([av])}, MODS)
    return phi["audio"].item(), phi["visual"].item()


@pytest.mark.parametrize(
    ("a", "v", "av", "phi", "copies"),
    [
        (True, False, True, (1.5, 0.5), (0, 1)),  # audio alone right: only visual gets a copy
        (True, True, True, (1.0, 1.0), (0, 0)),  # all right: no copies (BalanceMM's 0/1 value gives 0.5 each)
        (False, False, False, (0.0, 0.0), (2, 2)),
        (True, False, False, (0.5, -0.5), (1, 3)),
    ],
)
def test_official_value_function_and_copy_counts(
    a: bool, v: bool, av: bool, phi: tuple[float, float], copies: tuple[int, int]
) -> None:
    got = _phi(a, v, av)
    assert got == pytest.approx(phi)
    assert copies_per_sample(torch.tensor(got)).tolist() == list(copies)


def test_copy_thresholds_are_open_intervals() -> None:
    phi = torch.tensor([1.0, 0.99, 0.4, 0.39, -0.1, -0.11, 1.5])
    assert copies_per_sample(phi).tolist() == [0, 1, 0, 2, 0, 3, 0]


def test_efficiency_holds_for_every_sample_with_three_modalities() -> None:
    mods = ("audio", "text", "visual")
    g = torch.Generator().manual_seed(0)
    correct = {s: torch.rand(50, generator=g) > 0.5 for s in coalitions(mods, include_empty=False)}
    phi = sample_values(correct, mods)
    total = phi["audio"] + phi["text"] + phi["visual"]
    torch.testing.assert_close(total, 3 * correct[frozenset(mods)].double())  # v(M) − v(∅)


def test_modality_level_fraction() -> None:
    gaps = 1 - torch.tensor([0.9, 0.6])  # γ = (0.1, 0.4)
    assert resample_fraction(gaps, 1.0, "linear") == pytest.approx(0.2)
    assert resample_fraction(gaps, 1.0, "tanh") == pytest.approx(math.tanh(0.2))
    assert resample_fraction(gaps, 2.0, "square") == pytest.approx(2 * 0.2**1.5)


def _method(num_modalities: int = 2, **hp: object) -> ModalityValuation:
    method = build_method("modality_valuation", TinyDataset(num_modalities), **hp)
    assert isinstance(method, ModalityValuation)
    return method


def test_modality_level_plan_adds_the_weaker_modality_alone() -> None:
    method = _method(variant="modality")
    phi = torch.tensor([[1.0, 0.25]]).repeat(100, 1).double()  # γ = (0, 0.75): D = (2/3)·0.75 = 0.5
    plan = method.modality_plan(phi)
    assert plan.extra_index is not None and plan.extra_present is not None
    assert plan.extra_index.numel() == 50  # ⌊0.5 · 100⌋ rows, with replacement
    assert plan.extra_present.tolist() == [[False, True]] * 50  # visual (larger γ) trains alone


def test_sample_level_plan_lists_each_copy_with_only_its_modality() -> None:
    method = _method()
    phi = torch.tensor([[1.5, 0.5], [1.0, 1.0], [0.5, -0.5]], dtype=torch.float64)
    plan = method.sample_plan(phi)
    assert plan.extra_index is not None and plan.extra_present is not None
    pairs = sorted(zip(plan.extra_index.tolist(), [tuple(p) for p in plan.extra_present.tolist()], strict=True))
    assert pairs == [(0, (False, True)), (2, (False, True)), (2, (False, True)), (2, (False, True)), (2, (True, False))]


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_valuation_values_every_training_row_from_the_coalition_predictions(num_modalities: int) -> None:
    data = TinyDataset(num_modalities)
    method = _method(num_modalities)
    phi = method.valuate()
    assert phi.shape == (24, num_modalities)
    rows = torch.arange(24)
    split = data.split("train")
    inputs = split.get_batch(rows)
    assert inputs is not None
    batch = Batch(inputs, split.labels, rows, torch.ones(24, num_modalities, dtype=torch.bool), data.modalities)
    subsets = coalitions(data.modalities, include_empty=False)
    method.eval()
    with torch.no_grad():
        _, logits = method.predict_coalitions(batch, subsets)
    expected = sample_values(dict(zip(subsets, logits.argmax(-1) == batch.label, strict=True)), data.modalities)
    for i, m in enumerate(data.modalities):
        torch.testing.assert_close(phi[:, i], expected[m])


def test_warmup_epochs_return_no_plan_then_a_plan() -> None:
    method = _method(warmup=2)
    assert method.on_epoch_start(0) is None and method.on_epoch_start(1) is None
    plan = method.on_epoch_start(2)
    assert plan is not None and plan.extra_present is not None
    logs = method.ctx.pop_logs()
    assert logs["valuation/extra_audio"] + logs["valuation/extra_visual"] == plan.extra_present.shape[0]


def test_a_copy_trains_only_its_modality() -> None:
    method = _method()
    batch = first_batch(TinyDataset()).with_only(frozenset({"audio"}))
    out = method.forward(batch)
    F.cross_entropy(out.logits, batch.label).backward()
    assert all(p.grad is None or not p.grad.any() for p in method.model.modality_parameters("visual"))
    assert any(p.grad is not None and p.grad.any() for p in method.model.modality_parameters("audio"))


def test_end_to_end_resampling_grows_the_epoch(tmp_path: Path) -> None:
    s = balancemm.train(
        "modality_valuation", "embedded", out=tmp_path / "r", sets=["train.epochs=2"], warmup=1, progress=False
    )
    assert s["flops"]["by_phase"]["valuation/estimate"] > 0
    records = [json.loads(x) for x in (tmp_path / "r/results.jsonl").read_text().splitlines()]
    epoch1 = next(r for r in records if r["split"] == "val" and r["epoch"] == 1)
    assert epoch1["train"]["valuation/extra_audio"] + epoch1["train"]["valuation/extra_visual"] > 0
