"""PMR against numbers computed by hand from its equations (docs/methods/pmr.md), and its behaviour."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.pmr  # noqa: F401  (registers "pmr")
from balancemm.errors import ConfigError
from balancemm.methods import RunContext, create_method
from balancemm.methods.pmr import PMR, pmr_coefficients, proto_logits, update_prototypes
from balancemm.metrics.flops import FlopMeter
from balancemm.models.classifier import ModelOutput
from tests.conftest import TinyDataset, first_batch, tiny_model


def _method(data: TinyDataset, batch_size: int = 8, meter: FlopMeter | None = None, **hp: Any) -> PMR:
    model = tiny_model(data)
    ctx = RunContext(data.modalities, dataset=data, batch_size=batch_size, meter=meter)
    method = create_method("pmr", model, ctx, **hp)
    assert isinstance(method, PMR)
    return method


def _class_means(method: PMR, data: TinyDataset) -> dict[str, torch.Tensor]:
    """Eval-mode class means of the whole training split, one class at a time (the slow, obvious way)."""
    split = data.split("train")
    batch = first_batch(data, n=len(split))
    method.model.eval()
    with torch.no_grad():
        features = method.model.encode(batch)
    method.model.train()
    return {
        m: torch.stack([h[split.labels == k].mean(0) for k in range(data.num_classes)]) for m, h in features.items()
    }


# -- numbers computed by hand -------------------------------------------------------------------------


def test_spec_distances_and_proto_probabilities() -> None:
    # c_0 = [0, 0], c_1 = [3, 4], h = [0, 0] → d = [0, 5], q = softmax(−d) = [0.993307, 0.006693]
    logits = proto_logits(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert logits.tolist()[0] == pytest.approx([0.0, -5.0], abs=1e-6)
    assert logits.softmax(1).tolist()[0] == pytest.approx([0.993307, 0.006693], abs=1e-6)
    # PCE with label 0 is −log 0.993307
    assert F.cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(0.006715348, abs=1e-6)


def test_momentum_update_by_hand() -> None:
    # μ = 0.5, old [0, 0], new mean [2, 2] → [1, 1]; the mean here comes from two rows summing to [4, 4]
    old = torch.tensor([[0.0, 0.0]])
    new = update_prototypes(old, torch.tensor([[4.0, 4.0]]), torch.tensor([2]), torch.tensor([True]), 0.5)
    assert new.tolist() == [[1.0, 1.0]]
    # the first measurement of a class takes the mean as is
    first = update_prototypes(old, torch.tensor([[4.0, 4.0]]), torch.tensor([2]), torch.tensor([False]), 0.5)
    assert first.tolist() == [[2.0, 2.0]]


def test_equal_scores_give_exactly_the_plain_ce() -> None:
    data = TinyDataset()
    method = _method(data, alpha=1.0)
    batch = first_batch(data)
    out = method.forward(batch)
    # All prototypes at one point: q is uniform in both modalities, so s^p_a == s^p_v.
    for m in data.modalities:
        method.prototypes(m).fill_(0.5)
    losses = method.losses(out, batch)
    assert set(losses) == {"ce", "pce_audio", "pce_visual"}
    total = torch.stack(list(losses.values())).sum()
    assert torch.equal(total, F.cross_entropy(out.logits, batch.label))
    logs = method.ctx.pop_logs()
    assert logs["pmr/rho_audio"] == logs["pmr/rho_visual"] == 1.0
    assert logs["pmr/beta_audio"] == logs["pmr/beta_visual"] == 0.0


# -- coefficients -------------------------------------------------------------------------------


def _official_binary(s_a: float, s_v: float, alpha: float) -> list[float]:
    ratio = s_a / s_v  # main_Prototype_grad.py: ratio_a_p = score_a_p / score_v_p
    if ratio > 1:
        return [0.0, alpha]
    if ratio < 1:
        return [alpha, 0.0]
    return [0.0, 0.0]


@pytest.mark.parametrize("scores", [(3.0, 6.0), (6.0, 3.0), (5.0, 5.0), (0.25, 0.2), (7.5, 7.500001)])
def test_two_modalities_follow_the_official_binary_rule(scores: tuple[float, float]) -> None:
    beta, rho = pmr_coefficients(torch.tensor(scores, dtype=torch.float64), alpha=0.7)
    assert beta.tolist() == _official_binary(*scores, alpha=0.7)
    assert rho[0].item() == pytest.approx(scores[0] / scores[1])  # the logged ratio is the official one


def test_three_modalities_use_the_mean_of_the_others() -> None:
    # s = (6, 2, 4): means of the others (3, 5, 4) → ρ = (2, 0.4, 1) → only the second gets α
    beta, rho = pmr_coefficients(torch.tensor([6.0, 2.0, 4.0]), alpha=2.0)
    assert rho.tolist() == pytest.approx([2.0, 0.4, 1.0])
    assert beta.tolist() == [0.0, 2.0, 0.0]
    # s = (1, 1, 4): others (2.5, 2.5, 1) → ρ = (0.4, 0.4, 4) → both weak modalities get α
    beta, _ = pmr_coefficients(torch.tensor([1.0, 1.0, 4.0]), alpha=2.0)
    assert beta.tolist() == [2.0, 2.0, 0.0]
    assert pmr_coefficients(torch.tensor([3.0, 3.0, 3.0]), alpha=2.0)[0].tolist() == [0.0, 0.0, 0.0]


# -- prototypes ---------------------------------------------------------------------------------


def test_prototypes_are_eval_mode_class_means_and_bn_is_untouched() -> None:
    data = TinyDataset()
    method = _method(data, proto_fraction=1.0)  # every batch, so the sample is the whole split
    bn_before = {n: b.clone() for n, b in method.model.named_buffers()}
    method.on_epoch_start(0)
    expected = _class_means(method, data)
    for m in data.modalities:
        torch.testing.assert_close(method.prototypes(m), expected[m])
    assert method.model.training  # the mode is restored
    assert all(torch.equal(b, bn_before[n]) for n, b in method.model.named_buffers())
    assert method.seen.all()


def test_the_second_computation_uses_momentum() -> None:
    data = TinyDataset()
    method = _method(data, proto_fraction=1.0, momentum_coef=0.25)
    method.on_epoch_start(0)
    first = {m: method.prototypes(m).clone() for m in data.modalities}
    with torch.no_grad():  # move the encoders so the new class means differ
        for p in method.model.encoders.parameters():
            p.add_(0.1)
    method.on_epoch_start(1)
    new = _class_means(method, data)
    for m in data.modalities:
        torch.testing.assert_close(method.prototypes(m), 0.75 * new[m] + 0.25 * first[m])


def _prototype_schedule(method: PMR, data: TinyDataset, means: list[float]) -> list[list[float]]:
    """The prototypes after computations at the start of epochs 0, 1, …, when the k-th computation sees
    the feature means[k] + 10·y on every row and coordinate (so class y's mean is exactly that)."""
    value = [0.0]

    def encode(batch: Any, only: Any = None) -> dict[str, torch.Tensor]:
        rows = (value[0] + 10 * batch.label).float()[:, None]
        return {m: rows.expand(-1, d) for m, d in method.model.fusion.dims.items()}

    method.model.encode = encode  # type: ignore[method-assign]
    schedule = []
    for epoch, mean in enumerate(means):
        value[0] = mean
        method.on_epoch_start(epoch)
        per_modality = {m: method.prototypes(m) for m in data.modalities}
        # every coordinate of every modality holds the same number per class
        assert all(bool((p == p[:, :1]).all()) for p in per_modality.values())
        columns = [p[:, 0].tolist() for p in per_modality.values()]
        assert all(c == columns[0] for c in columns)
        schedule.append(columns[0])
    return schedule


def test_momentum_from_third_is_the_official_schedule() -> None:
    # main_Prototype_grad.py 435: `if epoch <= 0` no blend, `epoch` being the epoch just trained and 0
    # before training. Class means 2, 4, 6 (+10·y) in the computations before epochs 0, 1, 2, μ = 0.5:
    #   start of epoch 0 (official: before training, epoch = 0) → 2, the mean as is
    #   start of epoch 1 (official: after epoch 0, epoch = 0)   → 4, the mean as is again
    #   start of epoch 2 (official: after epoch 1, epoch = 1)   → 0.5·6 + 0.5·4 = 5
    data = TinyDataset(num_classes=2)
    method = _method(data, proto_fraction=1.0, momentum_coef=0.5, momentum_from="third")
    assert _prototype_schedule(method, data, [2.0, 4.0, 6.0]) == [[2.0, 12.0], [4.0, 14.0], [5.0, 15.0]]


def test_momentum_starts_with_the_second_computation_by_default() -> None:
    # The same class means and μ: 2; then 0.5·4 + 0.5·2 = 3; then 0.5·6 + 0.5·3 = 4.5 (+10·y each).
    data = TinyDataset(num_classes=2)
    method = _method(data, proto_fraction=1.0, momentum_coef=0.5)
    assert method.hp.momentum_from == "second"
    assert _prototype_schedule(method, data, [2.0, 4.0, 6.0]) == [[2.0, 12.0], [3.0, 13.0], [4.5, 14.5]]


def _rows_read(data: TinyDataset, batch_size: int) -> int:
    method = _method(data, batch_size=batch_size)
    rows: list[int] = []
    encode = method.model.encode

    def spy(batch: Any, only: Any = None) -> dict[str, torch.Tensor]:
        rows.extend(batch.index.tolist())
        return encode(batch, only)

    method.model.encode = spy  # type: ignore[method-assign]
    method.on_epoch_start(0)
    assert len(set(rows)) == len(rows)
    return len(rows)


def test_only_the_first_tenth_of_the_shuffled_batches_is_read() -> None:
    data = TinyDataset(n=48)
    assert _rows_read(data, batch_size=2) == 2 * 2  # 24 batches → ⌊24/10⌋ = 2 batches of 2 rows
    assert _rows_read(data, batch_size=8) == 8  # 6 batches → ⌊0.6⌋ = 0 → at least one batch


def test_an_absent_class_keeps_its_prototype() -> None:
    data = TinyDataset(num_classes=4)
    labels = data.split("train").labels
    labels[labels == 3] = 0  # class 3 never appears in the training split
    method = _method(data, proto_fraction=1.0)
    method.prototypes("audio")[3] = 7.0
    method.on_epoch_start(0)
    assert torch.isfinite(method.prototypes("audio")).all() and torch.isfinite(method.prototypes("visual")).all()
    assert (method.prototypes("audio")[3] == 7.0).all() and (method.prototypes("visual")[3] == 0.0).all()
    assert method.seen.tolist() == [True, True, True, False]


def test_prototypes_survive_a_state_dict_round_trip() -> None:
    data = TinyDataset(3)
    method = _method(data, proto_fraction=1.0)
    method.on_epoch_start(0)
    state = method.state_dict()
    assert {"prototypes_audio", "prototypes_text", "prototypes_visual", "seen"} <= set(state)
    clone = _method(data)
    clone.load_state_dict(state)
    for m in data.modalities:
        assert torch.equal(clone.prototypes(m), method.prototypes(m))
    assert torch.equal(clone.seen, method.seen)


def test_the_prototype_pass_is_counted_under_its_own_phase() -> None:
    data = TinyDataset()
    meter = FlopMeter("exact")
    method = _method(data, meter=meter)
    with meter.counting():
        method.on_epoch_start(0)
    assert set(meter.by_phase) == {"pmr/prototypes"} and meter.total > 0


# -- losses and gradients -----------------------------------------------------------------------


def test_outside_the_window_the_loss_is_plain_ce() -> None:
    data = TinyDataset()
    method = _method(data, modulation_starts=2, modulation_ends=4)
    method.on_epoch_start(0)
    batch = first_batch(data)
    out = method.forward(batch)
    for epoch, inside in [(1, False), (2, True), (4, True), (5, False)]:
        method.ctx.epoch = epoch
        losses = method.losses(out, batch)
        assert ("pce_audio" in losses) is inside
        if not inside:
            assert losses == {"ce": losses["ce"]}
            assert torch.equal(losses["ce"], F.cross_entropy(out.logits, batch.label))


def test_pce_reaches_only_the_weaker_encoder_and_never_the_prototypes(tiny: TinyDataset) -> None:
    method = _method(tiny, proto_fraction=1.0, alpha=1.0)
    method.on_epoch_start(0)
    batch = first_batch(tiny)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    assert set(losses) == {"ce"} | {f"pce_{m}" for m in tiny.modalities}
    logs = method.ctx.pop_logs()
    beta = {m: logs[f"pmr/beta_{m}"] for m in tiny.modalities}
    assert 0 < sum(beta.values()) < len(beta)  # some modality is behind, not all
    torch.stack([v for k, v in losses.items() if k != "ce"]).sum().backward()
    assert not any(b.requires_grad for b in method.buffers())
    for m in tiny.modalities:
        grads = [p.grad for p in method.model.encoders[m].parameters()]
        has_grad = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        assert has_grad == (beta[m] > 0), m
        expected = F.cross_entropy(proto_logits(out.features[m], method.prototypes(m)), batch.label)
        torch.testing.assert_close(losses[f"pce_{m}"], beta[m] * expected)
    # PCE depends on the features only: the fusion head gets nothing from it
    assert all(p.grad is None or not p.grad.any() for p in method.model.head_parameters())


@pytest.mark.parametrize(
    ("modalities", "weak"), [(2, "audio"), (2, "visual"), (3, "text")], ids=["a-weak", "v-weak", "t-weak-M3"]
)
def test_the_weaker_modality_by_hand_gets_beta_and_only_it_is_pulled_to_its_prototype(
    modalities: int, weak: str
) -> None:
    # Two classes, prototypes c_0 = 0 and c_1 = (3, 4, 0, …) in every modality; four rows, labels 0 1 0 1.
    # A strong modality's features sit on their own class's prototype: d = (0, 5) → q(y) = 1/(1 + e⁻⁵)
    # = 0.993307 per row, s^p = 4·0.993307 = 3.973229. The weak one's sit half-way, (1.5, 2, 0, …):
    # d = (2.5, 2.5) → q(y) = ½, s^p = 2. Two modalities: ρ_weak = 2/3.973229 = 0.503369 < 1 → β = α.
    # Three (weak text): ρ_text = 2/3.973229 < 1, ρ_strong = 3.973229/((3.973229 + 2)/2) = 1.330346 > 1.
    data = TinyDataset(modalities, num_classes=2)
    alpha = 0.7
    method = _method(data, alpha=alpha)
    batch = first_batch(data, n=4)
    assert batch.label.tolist() == [0, 1, 0, 1]
    features = {}
    for m, d in method.model.fusion.dims.items():
        c = torch.zeros(2, d)
        c[1, :2] = torch.tensor([3.0, 4.0])
        method.prototypes(m).copy_(c)
        h = c[batch.label, :2] if m != weak else torch.tensor([1.5, 2.0]).expand(4, 2)
        features[m] = torch.cat([h, torch.zeros(4, d - 2)], 1).requires_grad_()
    out = ModelOutput(torch.zeros(4, 2, requires_grad=True), features, {})
    losses = method.losses(out, batch)
    logs = method.ctx.pop_logs()
    strong = [m for m in data.modalities if m != weak]
    s_strong, s_weak = 4 / (1 + math.exp(-5)), 2.0
    assert logs[f"pmr/beta_{weak}"] == alpha and all(logs[f"pmr/beta_{m}"] == 0.0 for m in strong)
    rho_strong = s_strong / s_weak if modalities == 2 else s_strong / ((s_strong + s_weak) / 2)
    assert logs[f"pmr/rho_{weak}"] == pytest.approx(s_weak / s_strong, abs=1e-6)  # 0.503369
    assert all(logs[f"pmr/rho_{m}"] == pytest.approx(rho_strong, abs=1e-6) for m in strong)
    # PCE of the weak modality: α·CE(uniform over 2) = 0.7·ln 2; the strong ones' are weighted by 0.
    assert losses[f"pce_{weak}"].item() == pytest.approx(alpha * math.log(2), abs=1e-6)
    assert all(losses[f"pce_{m}"].item() == 0.0 for m in strong)
    torch.stack([v for k, v in losses.items() if k != "ce"]).sum().backward()
    # ∂(α·CE)/∂h_i = (α/B)·Σ_k (q_k − 1[k = y_i])·(−(h_i − c_k)/d_k) = (α/B)·(0.5/2.5)·(c_1 − c_0)·(+1 if y_i = 0
    # else −1) = 0.7/4·0.2·(3, 4) = ±(0.105, 0.14): a descent step moves each weak row to its own prototype.
    sign = 1 - 2 * batch.label[:, None].float()
    expected = torch.cat([sign * torch.tensor([0.105, 0.14]), torch.zeros(4, features[weak].shape[1] - 2)], 1)
    torch.testing.assert_close(features[weak].grad, expected)
    assert all(not features[m].grad.any() for m in strong)  # type: ignore[union-attr]


def test_hyper_parameters_are_validated() -> None:
    data = TinyDataset()
    with pytest.raises(ConfigError):
        create_method("pmr", tiny_model(data), modulation_starts=5, modulation_ends=4)
    with pytest.raises(ConfigError):
        create_method("pmr", tiny_model(data), momentum_coef=1.5)
    with pytest.raises(ConfigError):
        create_method("pmr", tiny_model(data), proto_fraction=0.0)
    with pytest.raises(ConfigError):
        create_method("pmr", tiny_model(data), momentum_from="first")


# -- data-parallel runs -------------------------------------------------------------------------


def test_on_a_rank_of_two_the_prototypes_are_the_class_means_of_every_ranks_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = TinyDataset()
    method = _method(data, proto_fraction=1.0)
    summed: list[torch.Tensor] = []
    other_counts = torch.tensor([2, 0, 1])  # the other rank sampled 2 rows of class 0 and 1 of class 2 …
    other_sums = {m: torch.ones(data.num_classes, d) for m, d in method.model.fusion.dims.items()}  # … summing to 1s

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        summed.append(t.clone())
        if t.dtype == torch.long:
            return t + other_counts
        return t + other_sums[data.modalities[len(summed) - 1]]

    monkeypatch.setattr(method.ctx, "all_sum", all_sum)
    method.on_epoch_start(0)
    *sums, counts = summed  # this rank's feature sums (one per modality, in order), then its counts
    assert len(sums) == len(data.modalities) and counts.sum() == len(data.split("train"))
    total = counts + other_counts
    for m, s in zip(data.modalities, sums, strict=True):
        torch.testing.assert_close(method.prototypes(m), (s + other_sums[m]) / total[:, None])
    assert method.ctx.pop_logs()["pmr/classes_sampled"] == data.num_classes


def test_on_a_rank_of_two_the_weaker_modality_is_the_global_batchs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hand-computed shard of the test above, weak audio: s^p = (2, 3.973229) on this rank. The other
    # rank's shard scores (4, 0) make audio the stronger one over the global batch: (6, 3.973229).
    data = TinyDataset(2, num_classes=2)
    method = _method(data, alpha=0.7)
    batch = first_batch(data, n=4)
    features = {}
    for m, d in method.model.fusion.dims.items():
        c = torch.zeros(2, d)
        c[1, :2] = torch.tensor([3.0, 4.0])
        method.prototypes(m).copy_(c)
        h = c[batch.label, :2] if m != "audio" else torch.tensor([1.5, 2.0]).expand(4, 2)
        features[m] = torch.cat([h, torch.zeros(4, d - 2)], 1)
    summed: list[torch.Tensor] = []

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        summed.append(t)
        return t + torch.tensor([4.0, 0.0], dtype=t.dtype)

    monkeypatch.setattr(method.ctx, "all_sum", all_sum)
    losses = method.losses(ModelOutput(torch.zeros(4, 2), features, {}), batch)
    logs = method.ctx.pop_logs()
    (local,) = summed
    assert local.tolist() == pytest.approx([2.0, 4 / (1 + math.exp(-5))], abs=1e-6)  # the shard's sums
    assert logs["pmr/beta_audio"] == 0.0 and logs["pmr/beta_visual"] == 0.7
    assert losses["pce_audio"].item() == 0.0 and losses["pce_visual"].item() > 0.0
