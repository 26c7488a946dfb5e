"""AUG against numbers computed by hand from its equations (docs/methods/aug.md) and its behaviour."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.aug as aug
from balancemm.errors import ConfigError
from balancemm.models.fusions.boosted import BoostedFusion, Ensemble
from balancemm.schema import resolve_epoch
from tests.conftest import TinyDataset, build_method, encoders_stepped, first_batch, train_epochs

# -- numbers computed by hand -------------------------------------------------------------------------


def test_residual_loss_by_hand() -> None:
    o, a, y = torch.tensor([[1.0, 0.5, -0.5]]), torch.tensor([[0.2, 0.4, -0.1]]), torch.tensor([0])
    f = o + a
    assert f.tolist()[0] == pytest.approx([1.2, 0.9, -0.6])
    assert float(F.cross_entropy(f, y)) == pytest.approx(0.645068, abs=1e-6)
    assert float(F.cross_entropy(o, y)) == pytest.approx(0.604131, abs=1e-6)
    assert float(F.cross_entropy(a, y)) == pytest.approx(1.085939, abs=1e-6)
    assert float(o.softmax(1)[0, 0]) == pytest.approx(0.546549, abs=1e-6)
    loss = aug.boosted_loss(Ensemble(f, o, a), y, 0.5)
    assert float(loss) == pytest.approx(2.038378, abs=1e-6)
    # The code's form: CE(a, y) − 0.5·CE(a, y ⊙ softmax(o)) with one-hot soft targets (train_CREMAD.py:57).
    soft = F.one_hot(y, 3).float() * o.softmax(1)
    code = F.cross_entropy(f, y) + F.cross_entropy(o, y) + F.cross_entropy(a, y) - 0.5 * F.cross_entropy(a, soft)
    assert float(code) == pytest.approx(2.038378, abs=1e-6)
    # K = 0: the plain CE of the base learner.
    assert float(aug.boosted_loss(Ensemble(o, None, None), y, 0.5)) == pytest.approx(0.604131, abs=1e-6)


def test_the_residual_weight_is_per_sample() -> None:
    # Two rows: (1 − 0.5·p_i)·CE_i averaged, not (1 − 0.5·mean p)·mean CE.
    o = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    a = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([0, 0])
    p = o.softmax(1)[:, 0]
    ce = F.cross_entropy(a, y, reduction="none")
    expected = F.cross_entropy(o + a, y) + F.cross_entropy(o, y) + ((1 - 0.5 * p) * ce).mean()
    torch.testing.assert_close(aug.boosted_loss(Ensemble(o + a, o, a), y, 0.5), expected)
    assert not torch.allclose(
        expected, F.cross_entropy(o + a, y) + F.cross_entropy(o, y) + (1 - 0.5 * p.mean()) * ce.mean()
    )


def test_assignment_with_lambda_one() -> None:
    assert pytest.approx(1.333333, abs=1e-6) == 400 / 300
    assert aug.assignment([400.0, 300.0], 1.0, 0.01) == [False, True]  # r = 1.333333: video
    assert aug.assignment([300.0, 400.0], 1.0, 0.01) == [True, False]  # r = 0.75: audio
    assert pytest.approx(1.003333, abs=1e-6) == 301 / 300
    assert aug.assignment([301.0, 300.0], 1.0, 0.01) == [False, False]  # inside the dead band


def test_check_epochs_for_200_epochs() -> None:
    period = resolve_epoch("10%", 200, ge=1)
    checks = [e for e in range(200) if aug.is_check_epoch(e, period)]
    assert period == 20 and checks == [0, *range(19, 200, 20)] and len(checks) == 11
    assert checks[-1] == 199


def test_short_protocols_check_more_often() -> None:
    assert [e for e in range(30) if aug.is_check_epoch(e, resolve_epoch("10%", 30, ge=1))] == [0, *range(2, 30, 3)]
    assert all(aug.is_check_epoch(e, resolve_epoch("10%", 4, ge=1)) for e in range(4))


def test_prediction_is_the_weighted_sum_of_the_ensembles() -> None:
    fusion = BoostedFusion({"audio": 4, "visual": 4}, 3, hidden=8, weights=aug.fusion_weights(2, 0.4, None))
    z = fusion.combine({"audio": torch.tensor([[2.0, 0.0, 1.0]]), "visual": torch.tensor([[0.0, 1.5, 1.0]])})
    assert z.tolist()[0] == pytest.approx([0.8, 0.9, 1.0])
    assert int(z.argmax(1)) == 2


def test_three_modality_rule_and_weights() -> None:
    assert aug.fusion_weights(3, 0.4, None) == (0.33, 0.33, 0.34)
    assert aug.fusion_weights(2, 0.4, None) == (0.4, 0.6)
    assert aug.fusion_weights(4, 0.4, None) == (0.25,) * 4
    assert aug.threshold(2, None) == 1.0 and aug.threshold(3, None) == pytest.approx(0.4)
    assert aug.threshold(4, None) == pytest.approx(0.8 / 3) and aug.threshold(3, 0.7) == 0.7
    # r_m = S_m / Σ_{j≠m} S_j = 100/600, 300/400, 300/400 against λ = 0.4: only the first is behind.
    assert aug.assignment([100.0, 300.0, 300.0], 0.4, 0.01) == [True, False, False]
    # No dead band for M ≥ 3: r = 78/200 = 0.39 is below λ, r = 80/200 = 0.4 is not.
    assert aug.assignment([78.0, 100.0, 100.0], 0.4, 0.01) == [True, False, False]
    assert aug.assignment([80.0, 100.0, 100.0], 0.4, 0.01) == [False, False, False]
    # Two modalities both behind the third: each gets one (r = 50/250, 50/250, 200/100).
    assert aug.assignment([50.0, 50.0, 200.0], 0.4, 0.01) == [True, True, False]


# -- the head ------------------------------------------------------------------------------------------


def test_ensemble_sums_the_active_learners_and_counts_the_bias_each_time() -> None:
    torch.manual_seed(0)
    fusion = BoostedFusion({"audio": 5, "visual": 3}, 4, hidden=6, max_learners=3)
    h = torch.randn(2, 5)
    assert fusion.activate("audio") and fusion.activate("audio")
    parts = fusion.ensemble("audio", h)
    fc, emb, learners = fusion.fc, fusion.embedding["audio"], fusion.learners["audio"]
    e0 = fc(F.relu(emb(h)))
    a1, a2 = (fc(F.relu(learners[k](h))) for k in range(2))
    torch.testing.assert_close(parts.full, e0 + a1 + a2)
    torch.testing.assert_close(parts.rest, e0 + a1)
    torch.testing.assert_close(parts.newest, a2)
    # fc's bias enters once per learner: W·Σ_k r_k + (K + 1)·b
    relus = F.relu(emb(h)) + F.relu(learners[0](h)) + F.relu(learners[1](h))
    torch.testing.assert_close(parts.full, relus @ fc.weight.T + 3 * fc.bias)
    assert fusion.active.tolist() == [2, 0] and fusion.num_active("visual") == 0
    assert fusion.activate("audio") and not fusion.activate("audio")  # max_learners = 3
    assert fusion.active.tolist() == [3, 0]


def test_new_learners_start_xavier_normal_with_zero_bias() -> None:
    torch.manual_seed(0)
    fusion = BoostedFusion({"audio": 400, "visual": 400}, 3, hidden=300, max_learners=1)
    layer = fusion.learners["audio"][0]
    assert not layer.bias.any() and not fusion.fc.bias.any()
    assert float(layer.weight.detach().std()) == pytest.approx((2 / (400 + 300)) ** 0.5, rel=0.02)


def test_inactive_learners_get_no_gradient_and_the_counts_survive_a_reload() -> None:
    fusion = BoostedFusion({"audio": 4, "visual": 4}, 3, hidden=5, max_learners=2)
    fusion.activate("visual")
    features = {m: torch.randn(3, 4) for m in fusion.modalities}
    fusion(features).sum().backward()
    assert all(p.grad is None for p in fusion.learners["audio"].parameters())
    assert all(p.grad is None for p in fusion.learners["visual"][1].parameters())
    assert all(p.grad is not None for p in fusion.learners["visual"][0].parameters())
    assert {id(p) for p in fusion.dormant_parameters()} == {
        id(p) for p in [*fusion.learners["audio"].parameters(), *fusion.learners["visual"][1].parameters()]
    }
    fresh = BoostedFusion({"audio": 4, "visual": 4}, 3, hidden=5, max_learners=2)
    fresh.load_state_dict(fusion.state_dict())
    assert fresh.num_active("visual") == 1 and fresh.num_active("audio") == 0
    torch.testing.assert_close(fresh(features), fusion(features))


def test_the_head_refuses_wrong_options() -> None:
    with pytest.raises(ConfigError, match="one weight per modality"):
        BoostedFusion({"audio": 4, "visual": 4}, 3, weights=(1.0,))
    with pytest.raises(ConfigError, match="hidden >= 1"):
        BoostedFusion({"audio": 4, "visual": 4}, 3, hidden=0)


# -- the method ----------------------------------------------------------------------------------------


def _build(data: TinyDataset, **hp: Any) -> aug.AUG:
    method = build_method("aug", data, **hp)
    assert isinstance(method, aug.AUG)
    return method


def _weaker_first(method: aug.AUG) -> None:
    """As if epoch 0 ended with the first modality behind (S = 1 against 2 each): one learner for it."""
    method._scores = torch.tensor([1.0] + [2.0] * (len(method.model.modalities) - 1), dtype=torch.float64)
    method.on_epoch_end(0)
    method.on_epoch_start(1)


@pytest.mark.parametrize("num", [2, 3])
def test_one_step_per_modality_moves_that_modality_and_the_shared_layer(num: int) -> None:
    data = TinyDataset(num)
    method = _build(data)
    model, fusion, mods = method.model, method.fusion, method.model.modalities
    _weaker_first(method)
    assert [fusion.num_active(m) for m in mods] == [1] + [0] * (num - 1)
    batch = first_batch(data)
    reference = copy.deepcopy(method)
    moved, dormant_grads = [], []
    real = method.ctx.optimizer_step

    def spy(*args: Any, **kwargs: Any) -> None:
        dormant_grads.append([p.grad for p in method.dormant_parameters()])
        before = {id(p): p.detach().clone() for p in method.parameters()}
        real(*args, **kwargs)
        moved.append({id(p) for p in method.parameters() if not torch.equal(p, before[id(p)])})

    method.ctx.optimizer_step = spy  # type: ignore[method-assign]
    out, losses = method.training_step(batch)
    assert method.ctx.step == num and len(moved) == num
    assert all(g is None for grads in dormant_grads for g in grads)
    for k, m in enumerate(mods):
        own = {id(p) for p in model.modality_parameters(m)} | {id(p) for p in fusion.embedding[m].parameters()}
        own |= {id(p) for p in fusion.learners[m][:1].parameters()} if k == 0 else set()
        shared = {id(p) for p in fusion.fc.parameters()}
        assert moved[k] == own | shared, m
    # The first modality's loss is the boosted loss on the model before any step.
    features = reference.model.encode(batch)
    first = reference.fusion.ensemble(mods[0], features[mods[0]])
    torch.testing.assert_close(losses[f"uni_{mods[0]}"], aug.boosted_loss(first, batch.label, 0.5))
    weights = aug.fusion_weights(num, 0.4, None)
    torch.testing.assert_close(out.logits, sum(w * out.unimodal_logits[m] for w, m in zip(weights, mods, strict=True)))


def test_parity_mode_freezes_the_learners_but_passes_gradient_to_the_encoder() -> None:
    data = TinyDataset(2)
    method = _build(data, train_learners=False)
    fusion = method.fusion
    assert not any(p.requires_grad for p in fusion.learner_parameters())
    assert all(id(p) not in {id(q) for q in fusion.learner_parameters()} for p in method.trainable_parameters())
    _weaker_first(method)
    learner = fusion.learners["audio"][0]
    init = [p.detach().clone() for p in learner.parameters()]
    train_epochs(method, 1)
    assert all(torch.equal(p, q) for p, q in zip(learner.parameters(), init, strict=True))
    # ∂L/∂h includes the learner path: it differs from the gradient with the learner's input detached.
    h = torch.randn(4, fusion.dims["audio"], requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    (with_path,) = torch.autograd.grad(aug.boosted_loss(fusion.ensemble("audio", h), y, 0.5), h)
    e0 = fusion.fc(F.relu(fusion.embedding["audio"](h)))
    a1 = fusion.fc(F.relu(learner(h.detach())))
    (without,) = torch.autograd.grad(aug.boosted_loss(Ensemble(e0 + a1, e0, a1), y, 0.5), h)
    assert not torch.allclose(with_path, without)
    assert learner.weight.grad is None


def test_trained_learners_move_once_switched_on() -> None:
    data = TinyDataset(2)
    method = _build(data)
    _weaker_first(method)
    learner = method.fusion.learners["audio"][0]
    init = learner.weight.detach().clone()
    method.training_step(first_batch(data))
    assert not torch.equal(learner.weight, init)


def test_aca_uses_the_epochs_score_sums_and_switches_learners_on_at_the_next_epoch() -> None:
    data = TinyDataset(2)
    method = _build(data)
    ctx, fusion = method.ctx, method.fusion
    probs: list[torch.Tensor] = []
    real = method.training_step

    def spy(batch: Any) -> Any:
        out, losses = real(batch)
        probs.append(
            torch.stack(
                [
                    F.softmax(out.unimodal_logits[m], 1).gather(1, batch.label[:, None]).sum()
                    for m in method.model.modalities
                ]
            )
        )
        return out, losses

    summed: list[torch.Tensor] = []
    all_sum = ctx.all_sum

    def spy_sum(t: torch.Tensor) -> torch.Tensor:
        summed.append(t.clone())
        return all_sum(t)

    method.training_step = spy  # type: ignore[method-assign]
    ctx.all_sum = spy_sum  # type: ignore[method-assign]
    method.on_epoch_start(0)
    method.train_epoch(0, ctx.batches("train", shuffle=True))
    method.on_epoch_end(0)
    (scores,) = summed
    torch.testing.assert_close(scores, torch.stack(probs).sum(0).double())
    s = scores.tolist()
    expected = [s[0] / s[1] < 0.99, s[0] / s[1] > 1.01]
    assert method.pending.tolist() == expected
    assert fusion.active.tolist() == [0, 0]  # validation after epoch 0 sees the model without it
    method.on_epoch_start(1)
    assert fusion.active.tolist() == [int(x) for x in expected] and not method.pending.any()


def test_no_check_between_periods_and_the_last_decision_is_never_applied() -> None:
    data = TinyDataset(2)
    method = _build(data, check_every=3)
    method._scores = torch.tensor([1.0, 2.0], dtype=torch.float64)
    method.on_epoch_end(1)  # (1 + 1) mod 3 ≠ 0
    assert not method.pending.any()
    method.on_epoch_end(2)
    assert method.pending.tolist() == [True, False]


def test_the_learner_count_resumes_exactly() -> None:
    data = TinyDataset(3)
    method = _build(data)
    _weaker_first(method)
    method._scores = torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64)
    method.on_epoch_end(1)
    clone = _build(data)
    clone.load_state_dict(method.state_dict())
    assert clone.fusion.active.tolist() == [1, 0, 0] and clone.pending.tolist() == [False, True, False]
    clone.on_epoch_start(2)
    assert [clone.fusion.num_active(m) for m in clone.model.modalities] == [1, 1, 0]


def test_model_spec_and_its_refusals() -> None:
    data = TinyDataset(3)
    method = _build(data, weights=(0.2, 0.3, 0.5), hidden=16, max_learners=2)
    fusion = method.fusion
    assert fusion.weights == [0.2, 0.3, 0.5] and fusion.fc.in_features == 16 and fusion.max_learners == 2
    assert method.model.unimodal_heads is None
    with pytest.raises(ConfigError, match="one weight per modality"):
        _build(data, weights=(0.5, 0.5))
    with pytest.raises(ConfigError, match="non-negative"):
        _build(data, weights=(-0.5, 1.0, 0.5))


def test_predict_gives_the_weighted_ensembles_and_coalitions_zero_features() -> None:
    data = TinyDataset(2)
    method = _build(data).eval()
    model = method.model
    batch = first_batch(data)
    with torch.no_grad():
        out = method.predict(batch)
        features = model.encode(batch)
        f = {m: method.fusion.ensemble(m, h).full for m, h in features.items()}
        torch.testing.assert_close(out.logits, 0.4 * f["audio"] + 0.6 * f["visual"])
        torch.testing.assert_close(out.unimodal_logits["audio"], f["audio"])
        _, coal = method.predict_coalitions(batch, [frozenset({"audio"})])
        zero = method.fusion.ensemble("visual", torch.zeros_like(features["visual"])).full
        torch.testing.assert_close(coal[0], 0.4 * f["audio"] + 0.6 * zero)


def contract_aug(data: TinyDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """AUG: one optimiser step per modality, each moving that modality's encoder only; the weaker modality (ACA)
    gets the learner, switched on at the next epoch; the boosted loss and the weighted prediction by hand."""
    batch = first_batch(data)
    method = build_method("aug", data)
    model, mods = method.model, method.model.modalities
    fusion = method.fusion  # type: ignore[attr-defined]
    # S = (1, 2[, 2]): r = 0.5 < λ − 0.01 (M = 2) or r_a = 1/4 < λ = 0.4 and r = 2/3 for the others (M = 3).
    method._scores = torch.tensor([1.0] + [2.0] * (len(mods) - 1), dtype=torch.float64)  # type: ignore[attr-defined]
    method.on_epoch_end(0)
    assert fusion.active.tolist() == [0] * len(mods)
    method.on_epoch_start(1)
    assert fusion.active.tolist() == [1] + [0] * (len(mods) - 1)
    reference = copy.deepcopy(model)
    stepped = encoders_stepped(method, monkeypatch)
    _, losses = method.training_step(batch)
    assert stepped == [{m} for m in mods]
    # L_a = CE(f) + CE(o) + mean_i (1 − 0.5·p_o(y_i))·CE_i(a) with f = o + a, on the model before the step.
    h = reference.encode(batch)[mods[0]]
    head = reference.fusion
    o = head.fc(F.relu(head.embedding[mods[0]](h)))
    a = head.fc(F.relu(head.learners[mods[0]][0](h)))
    p = o.softmax(1).gather(1, batch.label[:, None]).squeeze(1)
    ce_a = F.cross_entropy(a, batch.label, reduction="none")
    expected = F.cross_entropy(o + a, batch.label) + F.cross_entropy(o, batch.label) + ((1 - 0.5 * p) * ce_a).mean()
    torch.testing.assert_close(losses[f"uni_{mods[0]}"], expected.detach())
    # z = Σ_m w_m f_m with (0.4, 0.6) or (0.33, 0.33, 0.34).
    method.eval()
    with torch.no_grad():
        got = method.predict(batch).logits
        f = model.fusion.slice(model.encode(batch))
    weights = (0.4, 0.6) if len(mods) == 2 else (0.33, 0.33, 0.34)
    torch.testing.assert_close(got, sum(w * f[m] for w, m in zip(weights, mods, strict=True)))


@pytest.mark.parametrize("num", [2, 3])
def test_contract(num: int, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_aug(TinyDataset(num), monkeypatch)
