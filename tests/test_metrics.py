"""Metrics against hand-computed values: Shapley (eq. 7–8), imbalance (eq. 9–10), accuracy/F1, FLOPs."""

from __future__ import annotations

import random

import pytest
import torch
from sklearn.metrics import f1_score
from torch.utils.flop_counter import FlopCounterMode

from balancemm.data.batch import Batch
from balancemm.engine.evaluate import evaluate
from balancemm.methods import create_method
from balancemm.metrics.classification import accuracy, confusion_matrix, macro_f1
from balancemm.metrics.flops import FlopMeter
from balancemm.metrics.imbalance import imbalance_degree
from balancemm.metrics.shapley import coalitions, shapley_values, shapley_weight
from balancemm.models.classifier import ModelOutput
from tests.conftest import TinyDataset, tiny_model

F = frozenset


def test_coalitions_enumerate_all_subsets_smallest_first() -> None:
    assert coalitions(["a", "v"]) == [F(), F({"a"}), F({"v"}), F({"a", "v"})]
    assert len(coalitions(["a", "t", "v"])) == 8
    assert F() not in coalitions(["a", "v"], include_empty=False)


def test_shapley_two_players_by_hand() -> None:
    # v(∅)=0.10, v(a)=0.70, v(v)=0.30, v(av)=0.80
    # φ_a = ½[v(a)−v(∅)] + ½[v(av)−v(v)] = ½·0.60 + ½·0.50 = 0.55 ; φ_v = ½·0.20 + ½·0.10 = 0.15
    v = {F(): 0.10, F({"a"}): 0.70, F({"v"}): 0.30, F({"a", "v"}): 0.80}
    phi = shapley_values(v, ["a", "v"])
    assert phi["a"] == pytest.approx(0.55)
    assert phi["v"] == pytest.approx(0.15)
    assert sum(phi.values()) == pytest.approx(v[F({"a", "v"})] - v[F()])
    assert imbalance_degree(phi) == pytest.approx(0.40)  # eq. 9


def test_shapley_three_players_by_hand() -> None:
    # Weights for M=3: |S|=0 → 1/3, |S|=1 → 1/6, |S|=2 → 1/3.
    v = {F(): 0.1, F("a"): 0.6, F("t"): 0.3, F("v"): 0.2, F("at"): 0.7, F("av"): 0.65, F("tv"): 0.4, F("atv"): 0.8}
    # φ_a = 1/3(0.6−0.1) + 1/6(0.7−0.3) + 1/6(0.65−0.2) + 1/3(0.8−0.4) = 0.16667+0.06667+0.075+0.13333 = 0.44167
    # φ_t = 1/3(0.3−0.1) + 1/6(0.7−0.6) + 1/6(0.4−0.2) + 1/3(0.8−0.65) = 0.06667+0.01667+0.03333+0.05 = 0.16667
    # φ_v = 1/3(0.2−0.1) + 1/6(0.65−0.6) + 1/6(0.4−0.3) + 1/3(0.8−0.7) = 0.03333+0.00833+0.01667+0.03333 = 0.09167
    phi = shapley_values(v, ["a", "t", "v"])
    assert phi["a"] == pytest.approx(0.441667, abs=1e-6)
    assert phi["t"] == pytest.approx(0.166667, abs=1e-6)
    assert phi["v"] == pytest.approx(0.091667, abs=1e-6)
    assert sum(phi.values()) == pytest.approx(0.8 - 0.1)
    # eq. 10: (|0.44167−0.16667| + |0.44167−0.09167| + |0.16667−0.09167|) / 3 = (0.275+0.35+0.075)/3
    assert imbalance_degree(phi) == pytest.approx(0.7 / 3, abs=1e-6)


def test_shapley_weights_sum_to_one_and_efficiency_holds_for_random_games() -> None:
    assert shapley_weight(0, 2) == 0.5 and shapley_weight(1, 3) == pytest.approx(1 / 6)
    rnd = random.Random(0)
    for players in (["a", "v"], ["a", "t", "v"], ["a", "b", "c", "d"]):
        for _ in range(20):
            v = {s: rnd.random() for s in coalitions(players)}
            phi = shapley_values(v, players)
            assert sum(phi.values()) == pytest.approx(v[F(players)] - v[F()])


def test_imbalance_properties() -> None:
    assert imbalance_degree({"a": 0.3, "v": 0.3}) == 0  # null contribution
    # eq. 9: |φ_a − φ_v| = |0.1 − 0.7| = 0.6 whichever modality is ahead and whatever the order given
    assert imbalance_degree({"a": 0.1, "v": 0.7}) == pytest.approx(0.6, abs=1e-12)
    assert imbalance_degree({"v": 0.1, "a": 0.7}) == pytest.approx(0.6, abs=1e-12)
    # eq. 10: (|0.1 − 0.5| + |0.1 − 0.2| + |0.5 − 0.2|) / 3 = (0.4 + 0.1 + 0.3) / 3 = 0.8 / 3
    assert imbalance_degree({"v": 0.2, "a": 0.1, "t": 0.5}) == pytest.approx(0.8 / 3, abs=1e-12)
    assert imbalance_degree({"a": 0.5}) is None


def test_accuracy_and_macro_f1_match_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        label = torch.randint(0, 5, (50,), generator=g)
        pred = torch.where(torch.rand(50, generator=g) < 0.6, label, torch.randint(0, 5, (50,), generator=g))
        cm = confusion_matrix(pred, label, 6)  # class 5 never occurs nor is predicted: it counts as F1 = 0
        assert accuracy(cm) == pytest.approx(float((pred == label).float().mean()))
        expected = f1_score(label, pred, labels=range(6), average="macro", zero_division=0)
        assert macro_f1(cm) == pytest.approx(expected)
        assert macro_f1(cm) < f1_score(label, pred, average="macro", zero_division=0)  # present-only is higher


def test_macro_f1_averages_over_every_class_of_the_dataset_by_hand() -> None:
    # 3 classes; labels 0 0 1 1, predictions 0 1 1 1; class 2 neither occurs nor is predicted.
    # F1_0 = 2·1/(2·1 + 0 + 1) = 2/3, F1_1 = 2·2/(2·2 + 1 + 0) = 4/5, F1_2 = 0 (no support, no prediction).
    # Over all C = 3 classes (the paper's toolkit): (2/3 + 4/5 + 0)/3 = 22/45; over the classes present: 11/15.
    cm = confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 3)
    assert macro_f1(cm) == pytest.approx(22 / 45, abs=1e-15)
    # A class predicted but absent from the labels has F1 = 0 too (precision 0). Labels 0 0, predictions 0 2:
    # F1_0 = 2·1/(2·1 + 0 + 1) = 2/3, F1_1 = 0 (absent), F1_2 = 0 (one false positive) → (2/3)/3 = 2/9.
    assert macro_f1(confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 0]), 3)) == pytest.approx(2 / 9, abs=1e-15)


def test_evaluation_averages_macro_f1_over_every_class_of_the_dataset() -> None:
    # A 4-class dataset evaluated in two batches: labels 0 0 | 1 1, fused predictions 0 2 | 1 1. Class 2 is
    # predicted but absent from the labels, class 3 neither occurs nor is predicted. Summed confusion matrix:
    # F1_0 = 2·1/(2·1 + 0 + 1) = 2/3, F1_1 = 2·2/(2·2 + 0 + 0) = 1, F1_2 = 0 (one false positive), F1_3 = 0
    # → (2/3 + 1 + 0 + 0)/4 = 5/12 (over the classes in the labels: 5/6; over those seen at all: 5/9).
    # The visual logits predict 1 everywhere: F1_1 = 2·2/(2·2 + 2 + 0) = 2/3, the rest 0 → (2/3)/4 = 1/6.
    data = TinyDataset(num_classes=4)
    method = create_method("baseline", tiny_model(data))
    fused = {0: [0, 2], 1: [1, 1]}

    def predict_coalitions(batch: Batch, coals: list[frozenset[str]]) -> tuple[ModelOutput, torch.Tensor]:
        logits = 5.0 * torch.nn.functional.one_hot(torch.tensor(fused[int(batch.label[0])]), 4).float()
        visual = 5.0 * torch.nn.functional.one_hot(torch.ones(len(batch), dtype=torch.long), 4).float()
        out = ModelOutput(logits, {}, {"audio": logits, "visual": visual})
        return out, logits.expand(len(coals), -1, -1)

    method.predict_coalitions = predict_coalitions  # type: ignore[method-assign]
    split = data.split("train")
    batches = []
    for label in (0, 1):
        rows = torch.tensor([label, label + 4])  # TinyDataset's labels are arange(n) % 4
        assert split.labels[rows].tolist() == [label, label]
        present = torch.ones(2, 2, dtype=torch.bool)
        batches.append(Batch(split.get_batch(rows), split.labels[rows], rows, present, data.modalities))  # type: ignore[arg-type]
    result = evaluate(method, batches, data.num_classes)
    assert result["num_samples"] == 4 and result["accuracy"] == 0.75
    assert result["macro_f1"] == pytest.approx(5 / 12, abs=1e-15)
    assert result["per_modality"]["audio"]["macro_f1"] == pytest.approx(5 / 12, abs=1e-15)
    assert result["per_modality"]["visual"] == {"accuracy": 0.5, "macro_f1": pytest.approx(1 / 6, abs=1e-15)}


def test_flops_of_a_linear_layer_forward_and_backward() -> None:
    # y = x W^T + b, x [B, i], W [o, i]: forward 2·B·i·o; backward grad_x and grad_W 2·B·i·o each.
    b, i, o = 8, 16, 4
    layer = torch.nn.Linear(i, o)
    x = torch.randn(b, i, requires_grad=True)
    meter = FlopMeter()
    with meter.counting():
        with meter.phase("forward"):
            y = layer(x).sum()
        with meter.phase("backward"):
            y.backward()
    assert meter.by_phase["forward"] == 2 * b * i * o
    assert meter.by_phase["backward"] == 4 * b * i * o
    assert meter.total == 6 * b * i * o


def test_flop_meter_agrees_with_torch_flop_counter_on_a_conv_net() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )
    x = torch.randn(5, 1, 8, 8)
    meter = FlopMeter()
    with meter.counting():
        net(x).sum().backward()
    reference = FlopCounterMode(display=False)
    with reference:
        net(x).sum().backward()
    assert meter.total == reference.get_total_flops() > 0


@pytest.mark.parametrize("mode", ["use_mm_for_euclid_dist", "donot_use_mm_for_euclid_dist"])
def test_pairwise_distances_are_counted(mode: str) -> None:
    # torch has no formula for cdist; ours counts the cross term, 2·N·K·d (PMR's prototype distances)
    meter = FlopMeter()
    with meter.counting():
        torch.cdist(torch.randn(8, 5), torch.randn(3, 5), compute_mode=mode)
    assert meter.total == 2 * 8 * 3 * 5


def test_disabled_meter_counts_nothing() -> None:
    meter = FlopMeter("off")
    with meter.counting(), meter.step(2):
        torch.nn.Linear(3, 3)(torch.randn(2, 3))
    assert meter.total == 0


def test_sampled_mode_counts_first_steps_and_extrapolates_the_rest_per_sample() -> None:
    layer = torch.nn.Linear(16, 4)
    meter = FlopMeter("sampled", sample_steps=2)
    for batch in (8, 8, 8, 5):  # 2 counted steps (16 rows), 13 rows extrapolated
        with meter.step(batch), meter.phase("forward"):
            layer(torch.randn(batch, 16))
    meter.end_epoch()
    per_row = 2 * 16 * 4
    assert meter.by_phase["forward"] == 29 * per_row and meter.extrapolated == 13 * per_row


def test_each_kind_of_step_is_sampled_on_its_own() -> None:
    # A method owning the epoch alternates kinds of steps (ReconBoost: boost, then rectify); each kind
    # is counted on its own first steps, even when the other kind has used up the sample.
    small, large = torch.nn.Linear(16, 4), torch.nn.Linear(16, 40)
    meter = FlopMeter("sampled", sample_steps=1)
    for kind, layer in (("boost", small), ("rectify", large)):
        with meter.phase(kind, sticky=True):
            for _ in range(3):
                with meter.step(8):
                    layer(torch.randn(8, 16))
    meter.end_epoch()
    assert meter.by_phase["boost"] == 24 * 2 * 16 * 4 and meter.by_phase["rectify"] == 24 * 2 * 16 * 40
    assert meter.extrapolated == 16 * 2 * 16 * 4 + 16 * 2 * 16 * 40


def test_steps_inside_an_exactly_counted_region_do_not_disturb_sampling() -> None:
    layer = torch.nn.Linear(16, 4)
    meter = FlopMeter("sampled", sample_steps=1)
    with meter.counting(), meter.phase("side"):
        for _ in range(3):  # e.g. a side training in on_epoch_start: all counted, none sampled
            with meter.step(8):
                layer(torch.randn(8, 16))
    for batch in (8, 8):
        with meter.step(batch), meter.phase("forward"):
            layer(torch.randn(batch, 16))
    meter.end_epoch()
    per_row = 2 * 16 * 4
    assert meter.by_phase["side"] == 24 * per_row
    assert meter.by_phase["forward"] == 16 * per_row and meter.extrapolated == 8 * per_row


def test_sticky_phases_keep_inner_hook_phases() -> None:
    layer = torch.nn.Linear(4, 4)
    meter = FlopMeter("exact")
    # a side model's template phase ("forward") inside a method's sticky phase ("estimate")
    with meter.counting(), meter.phase("on_epoch_start"), meter.phase("estimate", sticky=True), meter.phase("forward"):
        layer(torch.randn(2, 4))
    with meter.counting(), meter.phase("losses"), meter.phase("teachers", sticky=True):
        layer(torch.randn(2, 4))
    assert dict(meter.by_phase) == {"estimate": 64, "teachers": 64}


# -- edges the mutation run found untested (docs/testing.md) ----------------------------------------


def test_accuracy_of_no_samples_is_zero_not_an_error() -> None:
    assert accuracy(torch.zeros(3, 3, dtype=torch.long)) == 0.0


def test_coalitions_without_the_empty_one_keep_every_singleton() -> None:
    a, t, v = frozenset("a"), frozenset("t"), frozenset("v")
    assert coalitions(["a", "t", "v"], include_empty=False) == [a, t, v, a | t, a | v, t | v, a | t | v]
    assert coalitions(["a", "v"]) == [frozenset(), a, v, a | v]


def test_batched_pairwise_distances_count_every_batch() -> None:
    meter = FlopMeter()
    with meter.counting():
        torch.cdist(torch.randn(2, 8, 5), torch.randn(2, 3, 5))
    assert meter.total == 2 * 2 * 8 * 3 * 5


def test_counting_keeps_every_keyword_argument_of_an_operator() -> None:
    # The meter sits between every operator and its implementation: dropping keywords would silently
    # change what a counted step computes (here the dtype and the reduction dimension).
    meter = FlopMeter()
    x = torch.arange(6.0).view(2, 3)
    with meter.counting():
        ramp = torch.arange(3, dtype=torch.float64)
        sums = torch.sum(x, dim=1, keepdim=True)
    assert ramp.dtype == torch.float64 and sums.tolist() == [[3.0], [12.0]]


def test_meter_defaults_and_errors() -> None:
    from balancemm.config import TrainConfig

    assert FlopMeter("sampled").sample_steps == TrainConfig().flops_sample_steps == 3
    with pytest.raises(ValueError, match="unknown FLOP counting mode 'fast'"):
        FlopMeter("fast")
    meter = FlopMeter()
    with meter.counting():  # outside any phase: booked as "other"
        torch.nn.Linear(4, 2)(torch.randn(3, 4))
    assert dict(meter.by_phase) == {"other": 2 * 3 * 4 * 2}


def test_a_fully_counted_kind_does_not_stop_the_extrapolation_of_the_next() -> None:
    small, large = torch.nn.Linear(16, 4), torch.nn.Linear(16, 40)
    meter = FlopMeter("sampled", sample_steps=1)
    with meter.phase("boost", sticky=True), meter.step(8):  # one step: nothing left to extrapolate
        small(torch.randn(8, 16))
    with meter.phase("rectify", sticky=True):
        for _ in range(3):
            with meter.step(8):
                large(torch.randn(8, 16))
    meter.end_epoch()
    assert meter.by_phase["rectify"] == 24 * 2 * 16 * 40 and meter.extrapolated == 16 * 2 * 16 * 40


def test_meter_state_round_trips_and_keeps_counting() -> None:
    meter = FlopMeter("sampled", sample_steps=1)
    for _ in range(2):
        with meter.step(4), meter.phase("forward"):
            torch.nn.Linear(8, 2)(torch.randn(4, 8))
    meter.end_epoch()
    state = meter.state_dict()
    assert state == {"by_phase": {"forward": 2 * 8 * 8 * 2}, "extrapolated": 4 * 2 * 8 * 2}
    resumed = FlopMeter("sampled", sample_steps=1)
    resumed.load_state_dict(state)
    with resumed.counting(), resumed.phase("forward"):
        torch.nn.Linear(8, 2)(torch.randn(1, 8))
    assert resumed.by_phase["forward"] == 9 * 2 * 8 * 2 and resumed.extrapolated == 4 * 2 * 8 * 2
    assert resumed.total == meter.total + 2 * 8 * 2
    with resumed.counting(), resumed.phase("backward"):  # a phase the checkpoint did not have
        torch.nn.Linear(8, 2)(torch.randn(1, 8))
    assert resumed.by_phase["backward"] == 2 * 8 * 2
