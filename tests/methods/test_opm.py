"""OPM against numbers computed by hand from its equations (docs/methods/opm.md) and its behaviour."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.opm  # noqa: F401  (registers "opm")
from balancemm.distributed import World
from balancemm.errors import ConfigError
from balancemm.methods.opm import OPM, OPMHParams, drop_features, frozen_head_slices, opm_drop_probabilities
from balancemm.models.classifier import ModelOutput
from balancemm.precision import Precision
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec


def _method(data: TinyDataset | None = None, **hp: Any) -> OPM:
    method = build_method("opm", data or TinyDataset(), **hp)
    assert isinstance(method, OPM)
    return method


def _q(scores: list[float], **kw: Any) -> list[float]:
    return opm_drop_probabilities(torch.tensor(scores), **{"q_base": 0.5, "lam": 0.5, **kw}).tolist()


# -- numbers computed by hand ------------------------------------------------------------------


def test_a_tie_drops_nothing() -> None:
    assert _q([3.0, 3.0]) == [0.0, 0.0]


def test_q_jumps_to_q_base_as_soon_as_rho_exceeds_one() -> None:
    # ρ = 1.0001: q = 0.5·(1 + 0.5·tanh(0.0001)) = 0.500025
    assert _q([1.0001, 1.0]) == pytest.approx([0.500025, 0.0], abs=1e-6)


def test_rho_two_with_official_and_balancemm_q_base() -> None:
    # ρ = 2: q = q_base·(1 + 0.5·tanh 1) = 0.690399 (q_base 0.5), 0.552319 (q_base 0.4)
    assert _q([4.0, 2.0]) == pytest.approx([0.690399, 0.0], abs=1e-6)
    assert _q([4.0, 2.0], q_base=0.4) == pytest.approx([0.552319, 0.0], abs=1e-6)
    assert _q([2.0, 4.0]) == pytest.approx([0.0, 0.690399], abs=1e-6)  # the dominant one may be either
    assert _q([4.0, 2.0], q_base=0.9) == [1.0, 0.0]  # 0.9·1.380797 clipped to 1


def test_both_three_modality_rules_reduce_to_the_official_one_for_two() -> None:
    assert _q([4.0, 2.0], ratio_to="sum") == _q([4.0, 2.0], ratio_to="mean")
    # M = 3, s = (3, 1, 1): mean → ρ_1 = 3 → 0.5·(1 + 0.5·tanh 2) = 0.741007;
    #                        sum  → ρ_1 = 1.5 → 0.5·(1 + 0.5·tanh 0.5) = 0.615529; others ρ < 1
    assert _q([3.0, 1.0, 1.0]) == pytest.approx([0.741007, 0.0, 0.0], abs=1e-6)
    assert _q([3.0, 1.0, 1.0], ratio_to="sum") == pytest.approx([0.615529, 0.0, 0.0], abs=1e-6)
    # s = (6, 2, 4): mean → ρ = (2, 0.4, 1) drops only the first; sum → ρ_1 = 1, nothing is dropped
    assert _q([6.0, 2.0, 4.0]) == pytest.approx([0.690399, 0.0, 0.0], abs=1e-6)
    assert _q([6.0, 2.0, 4.0], ratio_to="sum") == [0.0, 0.0, 0.0]


def test_theta_and_scale_with_equal_dims() -> None:
    # d = (4, 4), q = (0.552319, 0): θ = 0.276159, kept features scaled by 1/(1 − θ) = 1.381520
    h = {"audio": torch.rand(64, 4) + 0.5, "visual": torch.rand(64, 4) + 0.5}
    out, kept, theta = drop_features(h, torch.tensor([0.552319, 0.0], dtype=torch.float64), torch.Generator())
    assert theta == pytest.approx(0.276159, abs=1e-6)
    assert bool(kept.all())  # the never-dropped modality keeps every row
    torch.testing.assert_close(out["visual"], h["visual"] * 1.381520, rtol=1e-6, atol=0)
    zero = (out["audio"] == 0).all(1)  # whole rows are dropped, the others scaled by 1/(1 − θ)
    assert 0 < int(zero.sum()) < 64
    torch.testing.assert_close(out["audio"][~zero], h["audio"][~zero] * 1.381520, rtol=1e-6, atol=0)


def test_theta_weights_the_drop_rates_by_feature_size() -> None:
    # d = (4, 12), q = (0.5, 0): θ = 4·0.5/16 = 0.125
    h = {"audio": torch.ones(2, 4), "visual": torch.ones(2, 12)}
    _, _, theta = drop_features(h, torch.tensor([0.5, 0.0], dtype=torch.float64), torch.Generator())
    assert theta == 0.125


def test_rho_one_leaves_the_features_and_output_identical() -> None:
    data = TinyDataset()
    method = _method(data)
    features = method.model.encode(first_batch(data))
    q = opm_drop_probabilities(torch.tensor([2.5, 2.5]), 0.5, 0.5)
    out, kept, theta = drop_features(features, q, torch.Generator())
    assert theta == 0.0 and bool(kept.all())
    assert all(torch.equal(out[m], features[m]) for m in features)
    assert torch.equal(method.model.fuse(out), method.model.fuse(features))


# -- behaviour ----------------------------------------------------------------------------------


def test_p_exe_zero_is_exactly_the_plain_model() -> None:
    data = TinyDataset()
    method = _method(data, p_exe=0.0, modulation_starts=0)
    batch = first_batch(data)
    out = method.forward(batch)
    plain = method.model(batch)
    assert torch.equal(out.logits, plain.logits)
    assert torch.equal(method.losses(out, batch)["ce"], F.cross_entropy(plain.logits, batch.label))
    assert method.ctx.pop_logs()["opm/executed"] == 0.0


def test_an_executed_drop_zeroes_rows_of_the_dominant_modality_and_rescales_all() -> None:
    data = TinyDataset()
    method = _method(data, p_exe=1.0, modulation_starts=0, q_base=0.9)
    batch = first_batch(data, n=24)
    with torch.no_grad():
        plain = method.model.encode(batch)
        out = method.forward(batch)
    logs = method.ctx.pop_logs()
    q = [logs["opm/q_audio"], logs["opm/q_visual"]]
    assert sorted(q)[0] == 0.0 and sorted(q)[1] >= 0.9  # only the dominant modality is dropped
    dominant, other = ("audio", "visual") if q[0] > 0 else ("visual", "audio")
    scale = 1 / (1 - logs["opm/theta"])
    torch.testing.assert_close(out.features[other], plain[other] * scale)
    zero = (out.features[dominant] == 0).all(1)
    assert 0 < int(zero.sum()) < 24
    torch.testing.assert_close(out.features[dominant][~zero], plain[dominant][~zero] * scale)
    assert torch.equal(out.logits, method.model.fuse(out.features))
    assert method.kept is not None and bool(method.kept.all())  # the other modality keeps every row


def test_dropped_rows_are_removed_from_the_loss() -> None:
    data = TinyDataset()
    method = _method(data)
    batch = first_batch(data)
    out = method.model(batch)
    method.kept = torch.tensor([True, False, True, True, False, False, True, True])
    expected = F.cross_entropy(out.logits[method.kept], batch.label[method.kept])
    torch.testing.assert_close(method.losses(out, batch)["ce"], expected)


def test_a_batch_with_every_row_dropped_gives_a_zero_loss_and_zero_gradients() -> None:
    h = {"audio": torch.ones(6, 4), "visual": torch.ones(6, 4)}
    out, kept, theta = drop_features(h, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.Generator())
    assert theta == 1.0 and not bool(kept.any()) and all(bool((v == 0).all()) for v in out.values())
    data = TinyDataset()
    method = _method(data)
    batch = first_batch(data)
    model_out = method.model(batch)
    method.kept = torch.zeros(8, dtype=torch.bool)
    loss = method.losses(model_out, batch)["ce"]
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not bool(p.grad.any()) for p in method.model.parameters())
    # score_gradient="official": the ½θ² term goes with the batch, as the official code skips it
    theta = torch.tensor(0.4, requires_grad=True)
    method.theta = theta
    extra = method.losses(model_out, batch)["half_theta_sq"]
    extra.backward()
    assert extra.item() == 0.0 and theta.grad is not None and theta.grad.item() == 0.0


def test_some_rows_lose_every_modality_when_all_are_dropped() -> None:
    h = {"audio": torch.ones(256, 2), "visual": torch.ones(256, 2)}
    _, kept, _ = drop_features(h, torch.tensor([0.5, 0.5], dtype=torch.float64), torch.Generator().manual_seed(0))
    assert 0.15 < 1 - kept.float().mean().item() < 0.35  # P(both dropped) = 0.25


def test_the_keep_masks_come_from_the_run_generator() -> None:
    h = {"audio": torch.ones(64, 3), "visual": torch.ones(64, 3)}
    q = torch.tensor([0.5, 0.0], dtype=torch.float64)

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        return drop_features(h, q, torch.Generator().manual_seed(seed))[0]["audio"]

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    data = TinyDataset()
    runs = []
    for _ in range(2):
        method = _method(data, p_exe=1.0, modulation_starts=0)
        with torch.no_grad():
            runs.append(method.forward(first_batch(data, n=24)).features)
    assert all(torch.equal(runs[0][m], runs[1][m]) for m in runs[0])


def test_the_warm_up_epochs_are_not_modulated() -> None:
    data = TinyDataset()
    method = _method(data, p_exe=1.0)
    assert method.hp.modulation_starts == OPMHParams().modulation_starts == 6  # official: epoch <= 5 is warm-up
    batch = first_batch(data)
    method.ctx.epoch = 5
    method.forward(batch)
    assert method.kept is None and "opm/q_audio" not in method.ctx.pop_logs()
    method.ctx.epoch = 6
    method.forward(batch)
    assert method.kept is not None and "opm/q_audio" in method.ctx.pop_logs()


def test_three_modalities_train_and_log_every_probability(tiny: TinyDataset) -> None:
    method = _method(tiny, p_exe=1.0, modulation_starts=0)
    batch = first_batch(tiny)
    method.backward(method.losses(method.forward(batch), batch))
    logs = method.ctx.pop_logs()
    assert {f"opm/q_{m}" for m in tiny.modalities} <= set(logs)
    assert min(logs[f"opm/q_{m}"] for m in tiny.modalities) == 0.0  # the weakest is never dropped


# -- the gradient through the scores (score_gradient) --------------------------------------------


def _hand_case(**hp: Any) -> tuple[OPM, dict[str, torch.Tensor], dict[str, torch.Tensor], ModelOutput]:
    """One executed step on one sample of class 0, 2 classes, d = 6 per modality, with hand-set features
    h_a = (ln 3, 0, …), h_v = 0 and a head whose only non-zero weights are W[0, a_0] = W[0, v_0] = 1.
    Returns the method, the feature leaves (their ``.grad`` filled), the loss terms and the output."""
    data = TinyDataset(num_classes=2)
    method = _method(data, p_exe=1.0, modulation_starts=0, **hp)
    fc = method.fusion.fc_out
    assert method.fusion.dims == {"audio": 6, "visual": 6}
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[0, 0] = fc.weight[0, 6] = 1.0
    h = {"audio": torch.zeros(1, 6), "visual": torch.zeros(1, 6)}
    h["audio"][0, 0] = math.log(3)
    leaves = {m: v.requires_grad_() for m, v in h.items()}
    method.model.encode = lambda batch, only=None: dict(leaves)  # type: ignore[method-assign]
    batch = first_batch(data, n=1)
    assert batch.label.tolist() == [0]
    out = method.forward(batch)
    losses = method.losses(out, batch)
    method.backward(losses)
    return method, leaves, losses, out


def test_official_score_gradient_adds_the_gradient_of_half_theta_squared() -> None:
    # Classifier.py 21 returns θ as θ's gradient, so each executed drop adds θ·∇θ = ∇(½θ²), θ taken through
    # the scores of the live features with the head constant. By hand (t = tanh 0.5 = 0.462117):
    #   z_a = (ln 3, 0) → s_a = 3/4;  z_v = (0, 0) → s_v = 1/2;  ρ_a = 1.5, ρ_v = 2/3
    #   q_a = 0.5·(1 + 0.5·t) = 0.615529, q_v = 0;  θ = 6·q_a/12 = 0.307765;  ½θ² = 0.047360
    #   ∂q_a/∂ρ_a = 0.5·0.5·(1 − t²) = 0.196612;  ∂ρ_a/∂s_a = 1/s_v = 2;  ∂ρ_a/∂s_v = −s_a/s_v² = −3
    #   ∂s_a/∂h_a,0 = s_a(1 − s_a)·(W[0,a_0] − W[1,a_0]) = 0.1875;  ∂s_v/∂h_v,0 = 0.25
    #   ∂θ/∂h_a,0 = ½·0.196612·2·0.1875 = 0.036865;  ∂θ/∂h_v,0 = ½·0.196612·(−3)·0.25 = −0.073729
    #   extra gradient: h_a,0: 0.307765·0.036865 = 0.011346;  h_v,0: 0.307765·(−0.073729) = −0.022691
    # Every other coordinate meets only zero weights, and the head gets nothing (its weights are constants).
    official, h, losses, _ = _hand_case(score_gradient="official")
    plain, h0, losses0, _ = _hand_case()
    assert official.ctx.pop_logs()["opm/theta"] == pytest.approx(0.307765, abs=1e-6)
    assert set(losses) == {"ce", "half_theta_sq"} and set(losses0) == {"ce"}
    assert losses["half_theta_sq"].item() == pytest.approx(0.047360, abs=1e-6)
    assert torch.equal(losses["ce"], losses0["ce"])  # the same κ from the same run generator
    expected = {m: torch.zeros(1, 6) for m in h}
    expected["audio"][0, 0], expected["visual"][0, 0] = 0.011346, -0.022691
    for m in h:
        assert h[m].grad is not None and h0[m].grad is not None
        torch.testing.assert_close(h[m].grad - h0[m].grad, expected[m], rtol=0, atol=2e-6)
    for p, p0 in zip(official.model.head_parameters(), plain.model.head_parameters(), strict=True):
        assert p.grad is not None and p0.grad is not None and torch.equal(p.grad, p0.grad)


def test_by_default_an_executed_drop_trains_the_cross_entropy_only() -> None:
    # The same case without the extra term: h̃ = κ·h/(1 − θ) with 1/(1 − θ) = 1.444595, z_0 = h̃_a,0 + h̃_v,0
    # = κ_a·ln 3·1.444595, z_1 = 0, so ∂CE/∂h_m,0 = (σ(z_0) − 1)·κ_m·1.444595 (κ_v = 1: q_v = 0):
    #   κ_a = 1: σ(1.587050) = 0.830201 → h_a,0: −0.245291, h_v,0: −0.245291
    #   κ_a = 0: σ(0) = 0.5               → h_a,0: 0,         h_v,0: −0.722298
    method, h, losses, out = _hand_case()
    assert method.hp.score_gradient == "none" and method.theta is None and set(losses) == {"ce"}
    kappa_a = bool(out.features["audio"][0, 0] != 0)
    grad = {"audio": -0.245291 if kappa_a else 0.0, "visual": -0.245291 if kappa_a else -0.722298}
    for m in h:
        expected = torch.zeros(1, 6)
        expected[0, 0] = grad[m]
        assert h[m].grad is not None
        torch.testing.assert_close(h[m].grad, expected, rtol=0, atol=2e-6)
    assert out.unimodal_logits["audio"][0].tolist() == pytest.approx([math.log(3), 0.0])


def test_official_score_gradient_only_on_executed_drops_in_modulated_epochs() -> None:
    data = TinyDataset()
    batch = first_batch(data)
    skipped = _method(data, score_gradient="official", p_exe=0.0, modulation_starts=0)
    out = skipped.forward(batch)
    assert skipped.theta is None and set(skipped.losses(out, batch)) == {"ce"}
    assert not out.unimodal_logits["audio"].requires_grad
    method = _method(data, score_gradient="official", p_exe=1.0)
    method.ctx.epoch = 5  # warm-up
    assert set(method.losses(method.forward(batch), batch)) == {"ce"} and method.theta is None
    method.ctx.epoch = 6
    out = method.forward(batch)
    assert method.theta is not None and method.theta.item() == pytest.approx(method.ctx.pop_logs()["opm/theta"])
    assert set(method.losses(out, batch)) == {"ce", "half_theta_sq"}
    # the step's unimodal logits stay the model's slices, without a gradient
    with torch.no_grad():
        slices = method.model.unimodal(method.model.encode(batch))
    assert all(torch.equal(out.unimodal_logits[m], slices[m]) for m in slices)
    assert not any(z.requires_grad for z in out.unimodal_logits.values())


def test_frozen_head_slices_are_the_model_slices_with_a_gradient_to_the_features_only() -> None:
    data = TinyDataset(3)
    method = _method(data)
    features = {m: h.detach().requires_grad_() for m, h in method.model.encode(first_batch(data)).items()}
    frozen = frozen_head_slices(method.fusion, features)
    live = method.model.unimodal(features)
    assert all(torch.equal(frozen[m], live[m]) for m in live)
    torch.stack([z.sum() for z in frozen.values()]).sum().backward()
    assert all(h.grad is not None and bool(h.grad.any()) for h in features.values())
    assert all(p.grad is None for p in method.model.head_parameters())


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_the_official_score_gradient_under_mixed_precision(name: str) -> None:
    # The extra term alone: under fp16 loss scaling its gradients must come back unscaled, the same as
    # without scaling (a gradient handed back outside the loss would be 4096 times too small).
    data = TinyDataset()
    batch = first_batch(data)
    grads = []
    for scale in (2.0**12, 1.0):
        precision = Precision(name, "cpu", init_scale=scale)
        method = _method(data, precision=precision, p_exe=1.0, modulation_starts=0, score_gradient="official")
        with method.ctx.autocast():
            losses = method.losses(method.forward(batch), batch)
            assert torch.isfinite(losses["half_theta_sq"]) and losses["half_theta_sq"] > 0
            method.backward({"half_theta_sq": losses["half_theta_sq"]})
        grads.append({n: p.grad.clone() for n, p in method.model.encoders.named_parameters() if p.grad is not None})
        assert grads[-1] and any(bool(g.any()) for g in grads[-1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-2, atol=1e-3 * float(grads[1][n].abs().max()) + 1e-9)


@pytest.mark.parametrize("kw", [{"fusion": "sum"}, {"fusion": "gated"}, {"unimodal_heads": "linear"}])
def test_non_concat_models_are_refused(kw: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"model\.fusion=concat"):
        OPM.model_spec(tiny_spec(TinyDataset(), **kw), OPMHParams())


def test_score_gradient_is_validated() -> None:
    with pytest.raises(ConfigError, match="score_gradient"):
        _method(score_gradient="original")


# -- data-parallel runs -------------------------------------------------------------------------


def test_each_ranks_kappa_is_its_rows_of_the_one_process_draw() -> None:
    g = torch.Generator().manual_seed(0)
    h = {"audio": torch.randn(5, 3, generator=g), "visual": torch.randn(5, 3, generator=g)}
    q = torch.tensor([0.6, 0.3], dtype=torch.float64)
    whole, kept, _ = drop_features(h, q, torch.Generator().manual_seed(4))
    parts = [
        drop_features({m: x[a:b] for m, x in h.items()}, q, torch.Generator().manual_seed(4), (a, b, 5))
        for a, b in ((0, 3), (3, 5))  # two ranks holding 3 + 2 rows of a global batch of 5
    ]
    assert torch.equal(torch.cat([k for _, k, _ in parts]), kept)
    for m in h:
        assert torch.equal(torch.cat([out[m] for out, _, _ in parts]), whole[m])
    # One process: the rows are the whole batch, the same draw as without them.
    again, kept_again, _ = drop_features(h, q, torch.Generator().manual_seed(4), (0, 5, 5))
    assert torch.equal(kept_again, kept) and all(torch.equal(again[m], whole[m]) for m in h)


def test_on_a_rank_of_two_the_scores_kappa_and_ce_are_the_global_batchs(monkeypatch: pytest.MonkeyPatch) -> None:
    data = TinyDataset()
    method = _method(data, p_exe=1.0, modulation_starts=0)
    ctx = method.ctx
    other = torch.tensor([0.0, 6.0], dtype=torch.float64)  # the other rank's scores: visual dominates
    summed: list[torch.Tensor] = []

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        summed.append(t)
        # The scores get the other rank's; counts come from a second rank holding as many kept rows.
        return t + other.to(t.dtype) if t.shape == other.shape else 2 * t

    # Rank 0 of two, holding the first 8 rows of a global batch of 16 (no collective is really run).
    monkeypatch.setattr(ctx, "world", World(0, 2, 0, "gloo"))
    monkeypatch.setattr(ctx, "all_sum", all_sum)
    batch = replace(first_batch(data), share=0.5)
    state = ctx.generator.get_state()
    out = method.forward(batch)
    local = summed[0]
    assert not local.requires_grad and local.shape == (2,)
    q = opm_drop_probabilities(local + other, 0.5, 0.5)
    assert q[0] == 0 and q[1] > 0  # the global batch's dominant modality, not this shard's
    replay = torch.Generator().manual_seed(0)
    replay.set_state(state)
    assert float(torch.rand((), generator=replay)) < 1.0  # the execution coin
    u = torch.rand(16, 2, generator=replay, dtype=torch.float64)[:8]  # κ for all 16 rows, this rank's 8
    assert method.kept is not None and torch.equal(method.kept, (u < 1 - q).any(dim=1))
    kept = method.kept.float()
    per_row = F.cross_entropy(out.logits, batch.label, reduction="none")
    # The global batch's mean over kept rows, as this rank's share-weighted part of it.
    expected = (per_row * kept).sum() / (2 * kept.sum() * 0.5)
    torch.testing.assert_close(method.losses(out, batch)["ce"], expected)


def test_on_a_rank_of_two_half_theta_sq_is_the_global_value_with_its_share_undone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = TinyDataset()
    method = _method(data, p_exe=1.0, modulation_starts=0, score_gradient="official")
    ctx = method.ctx
    other = torch.tensor([0.0, 6.0])
    monkeypatch.setattr(ctx, "world", World(0, 2, 0, "gloo"))
    monkeypatch.setattr(ctx, "all_sum", lambda t: t + other.to(t.dtype) if t.shape == other.shape else 2 * t)
    batch = replace(first_batch(data), share=0.5)
    out = method.forward(batch)
    theta = method.theta
    assert theta is not None and theta.requires_grad
    half = method.losses(out, batch)["half_theta_sq"]
    assert half.item() == pytest.approx(0.5 * theta.item() ** 2)
    # The gradient reaches this rank's rows only; the gradient average weights it by its share (½).
    (grad,) = torch.autograd.grad(half, theta)
    assert grad.item() == pytest.approx(theta.item() / 0.5)
