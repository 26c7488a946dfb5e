"""Diagnosing & Re-learning against numbers computed by hand from its equations (docs/methods/relearning.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sklearn.cluster
import torch

import balancemm
from balancemm.methods import RunContext, create_method
from balancemm.methods.relearning import (
    ReLearning,
    cluster_purity,
    kmeans_purity,
    relearning_strength,
    soft_reinit_,
)
from tests.conftest import TinyDataset, first_batch, tiny_model


def _method(num_modalities: int = 2, seed: int = 0, **hp: Any) -> tuple[ReLearning, TinyDataset]:
    data = TinyDataset(num_modalities)
    ctx = RunContext(data.modalities, seed=seed, dataset=data, needs=ReLearning.needs, batch_size=8)
    method = create_method("relearning", tiny_model(data), ctx, **hp)
    assert isinstance(method, ReLearning)
    return method, data


def _official_purity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The official ``purity_score``: per cluster, vote its majority label, then accuracy."""
    voted = np.zeros_like(y_true)
    for cluster in np.unique(y_pred):
        voted[y_pred == cluster] = np.bincount(y_true[y_pred == cluster]).argmax()
    return float((voted == y_true).mean())


# -- numbers computed by hand -----------------------------------------------------------------


def test_strength_is_tanh_of_lambda_times_gap() -> None:
    assert relearning_strength(0.0, 3.0) == 0.0
    assert relearning_strength(0.1, 3.0) == pytest.approx(0.291313, abs=1e-6)  # tanh(0.3)
    assert relearning_strength(0.5, 3.0) == pytest.approx(0.905148, abs=1e-6)  # tanh(1.5)


def test_soft_reinit_moves_towards_the_initial_value() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    soft_reinit_([p], [torch.zeros(3)], relearning_strength(0.1, 3.0))
    torch.testing.assert_close(p.data, torch.full((3,), 0.708687), atol=1e-6, rtol=0)
    # α = 1 is a full re-initialisation
    soft_reinit_([p], [torch.full((3,), -2.0)], 1.0)
    assert p.data.tolist() == [-2.0, -2.0, -2.0]


def test_zero_gap_leaves_parameters_bit_identical() -> None:
    p = torch.nn.Parameter(torch.randn(4, 5))
    before = p.detach().clone()
    soft_reinit_([p], [torch.randn(4, 5)], relearning_strength(0.0, 3.0))
    assert torch.equal(p.data, before)


def test_purity_of_perfect_and_single_clusterings() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    assert cluster_purity(torch.tensor([2, 2, 0, 0, 0, 1]), labels) == 1.0  # cluster ids need not match classes
    # one cluster: the majority-class frequency, 3/6
    assert cluster_purity(torch.zeros(6, dtype=torch.long), labels) == 0.5
    # clusters {0,1}, {2,3,4,5} with labels (0,0) and (1,1,1,2): (2 + 3)/6
    assert cluster_purity(torch.tensor([0, 0, 1, 1, 1, 1]), labels) == pytest.approx(5 / 6)


def test_purity_equals_the_official_majority_vote() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        y = torch.randint(0, 4, (50,), generator=g)
        c = torch.randint(0, 6, (50,), generator=g)
        assert cluster_purity(c, y) == pytest.approx(_official_purity(y.numpy(), c.numpy()))


def test_kmeans_purity_separates_blobs_and_survives_fewer_rows_than_classes() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres[labels] + 0.1 * torch.randn(60, 2, generator=g)
    assert kmeans_purity(x, labels, n_clusters=3) == 1.0
    assert kmeans_purity(x[:2], labels[:2], n_clusters=3) == 1.0  # 2 rows, 3 classes: 2 clusters


def test_kmeans_uses_the_official_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = sklearn.cluster.KMeans

    def recording(**kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(sklearn.cluster, "KMeans", recording)
    kmeans_purity(torch.randn(12, 3), torch.arange(12) % 3, n_clusters=3, n_init=ReLearning.HParams().n_init)
    assert seen == [{"n_clusters": 3, "random_state": 0, "n_init": 10}]


# -- θ^0 -----------------------------------------------------------------------------------------


def test_initial_parameters_are_copies_of_every_encoder_parameter_and_no_buffer() -> None:
    method, _ = _method()
    for m in method.model.modalities:
        params = list(method.model.modality_parameters(m))
        initial = method.initial_parameters(m)
        assert len(initial) == len(params)
        assert all(torch.equal(p, p0) and p.data_ptr() != p0.data_ptr() for p, p0 in zip(params, initial, strict=True))
    # encoder buffers (BatchNorm running statistics) are not stored
    stored = [k for k in method.state_dict() if k.startswith("initial.")]
    n_params = sum(len(list(method.model.modality_parameters(m))) for m in method.model.modalities)
    assert len(stored) == n_params and len(list(method.model.encoders.buffers())) > 0


def test_initial_parameters_and_reinit_count_survive_a_state_dict_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = _method(reinit_epoch=1, reinit_num=1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3)
    a.reinits_done.fill_(1)
    b, _ = _method(reinit_epoch=1, reinit_num=1)
    for m in b.model.modalities:
        for t in b.initial_parameters(m):
            t.zero_()  # so that only loading can make them equal to a's
    b.load_state_dict(a.state_dict())
    for m in a.model.modalities:
        assert all(torch.equal(x, y) for x, y in zip(a.initial_parameters(m), b.initial_parameters(m), strict=True))
    # the budget of one re-initialisation was spent before the checkpoint: none after resuming
    calls: list[int] = []

    def record() -> dict[str, float]:
        calls.append(b.ctx.epoch)
        return {}

    monkeypatch.setattr(b, "relearn", record)
    b.on_epoch_start(2)
    assert calls == [] and int(b.reinits_done) == 1


# -- schedule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("epochs", "r", "n"), [(90, 20, 3), (10, 1, 3), (13, 3, 2), (30, 15, 2), (8, 2, 0)])
def test_reinitialises_exactly_after_the_official_epochs(
    monkeypatch: pytest.MonkeyPatch, epochs: int, r: int, n: int
) -> None:
    method, _ = _method(reinit_epoch=r, reinit_num=n)
    done: list[int] = []

    def record() -> dict[str, float]:
        done.append(method.ctx.epoch - 1)
        return {}

    monkeypatch.setattr(method, "relearn", record)
    for epoch in range(epochs):
        method.ctx.epoch = epoch
        method.on_epoch_start(epoch)
    # ours.py: after epoch e's training and evaluation, if e % R == 0 and e > 0, at most N times
    official = [e for e in range(epochs - 1) if e > 0 and e % r == 0][:n]
    assert done == official and int(method.reinits_done) == len(official) <= n
    assert 0 not in done


# -- the re-initialisation itself ------------------------------------------------------------------


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_relearn_moves_each_encoder_by_its_logged_alpha_and_touches_nothing_else(num_modalities: int) -> None:
    method, data = _method(num_modalities, reinit_epoch=1)
    model = method.model
    with torch.no_grad():  # stand-in for training: move every parameter, update BatchNorm statistics
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        model(first_batch(data, 16))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert not method.ctx.used_val

    method.train()
    method.on_epoch_start(2)  # diagnoses epoch 1

    logs = method.ctx.pop_logs()
    assert method.ctx.used_val and int(method.reinits_done) == 1 and method.training and model.training
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # BN running stats untouched
    for n, p in model.named_parameters():
        if not n.startswith("encoders."):
            assert torch.equal(p, params[n]), n  # the fusion head is not re-initialised
    moved = 0
    for m in model.modalities:
        gap = abs(logs[f"relearning/purity_train_{m}"] - logs[f"relearning/purity_val_{m}"])
        alpha = math.tanh(3 * gap)
        assert logs[f"relearning/gap_{m}"] == pytest.approx(gap) and logs[f"relearning/alpha_{m}"] == pytest.approx(
            alpha
        )
        names = [n for n in params if n.startswith(f"encoders.{m}.")]
        for n, p, p0 in zip(names, model.modality_parameters(m), method.initial_parameters(m), strict=True):
            torch.testing.assert_close(p.data, alpha * p0 + (1 - alpha) * params[n])
        moved += alpha > 0
    assert moved > 0  # this data gives a non-zero gap, so the path is really exercised


def test_max_rows_draws_a_subset_from_the_run_generator() -> None:
    method, data = _method(max_rows=10)
    state = method.ctx.generator.get_state()
    feats, labels = method.features("train")
    assert labels.shape == (10,) and all(f.shape[0] == 10 for f in feats.values())
    assert not torch.equal(method.ctx.generator.get_state(), state)
    same, _ = _method(max_rows=10)
    other, _ = _method(max_rows=10, seed=1)
    torch.testing.assert_close(same.features("train")[0], feats)
    assert not torch.equal(other.features("train")[0]["audio"], feats["audio"])  # another seed, other rows
    # without a cap (or a cap above the split size): every row in split order, generator untouched
    full, _ = _method(max_rows=100)
    state = full.ctx.generator.get_state()
    assert torch.equal(full.features("train")[1], data.split("train").labels)
    assert torch.equal(full.ctx.generator.get_state(), state)


def test_end_to_end_relearning_reads_validation_and_counts_its_flops(tmp_path: Path) -> None:
    s = balancemm.train("relearning", "embedded", out=tmp_path / "r", sets=["train.epochs=3"], reinit_epoch=1)
    assert s["used_validation_in_training"] is True
    assert s["flops"]["by_phase"]["relearning/diagnose"] > 0
    records = [json.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    logged = [r["epoch"] for r in records if r["split"] == "val" and "relearning/alpha_audio" in r["train"]]
    assert logged == [2]  # epoch 1 diagnosed at the start of epoch 2; epoch 0 never
