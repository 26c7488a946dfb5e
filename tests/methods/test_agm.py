"""AGM against hand-computed numbers from the official code (Lingy12/AGM_ICCV2023)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.agm as agm_module
from balancemm.data.batch import Batch
from balancemm.methods import Method, RunContext, create_method
from balancemm.methods.agm import (
    AGMHParams,
    agm_coefficients,
    agm_scores,
    modulated_sum,
    mono_outputs,
    zero_padded,
)
from balancemm.metrics.shapley import shapley_values
from tests.conftest import TinyDataset, build_method, first_batch, tiny_model

A, V, AV = frozenset("a"), frozenset("v"), frozenset("av")


def test_two_modality_decomposition_by_hand() -> None:
    fused = {AV: torch.tensor([[3.0, 0.0]]), A: torch.tensor([[2.0, 0.0]]), V: torch.tensor([[1.0, 0.0]])}
    o = mono_outputs(fused, ("a", "v"))
    assert o["a"].tolist() == [[2.0, 0.0]] and o["v"].tolist() == [[1.0, 0.0]]
    torch.testing.assert_close(o["a"] + o["v"], fused[AV])
    # the true Shapley value with f(∅) = [0.5, 0] is o_a − f(∅)/2 = [1.75, 0]
    phi = shapley_values({**fused, frozenset(): torch.tensor([[0.5, 0.0]])}, ("a", "v"))
    assert phi["a"].tolist() == [[1.75, 0.0]]


def test_three_modality_decomposition_is_the_shapley_formula() -> None:
    g = torch.Generator().manual_seed(0)
    names = ["a", "t", "v", "at", "av", "tv", "atv"]
    f = {frozenset(n): torch.randn(2, 3, generator=g) for n in names}
    o = mono_outputs(f, ("a", "t", "v"))
    k = frozenset
    expected_a = (f[k("atv")] - f[k("tv")] + f[k("a")]) / 3 + (f[k("at")] - f[k("t")] + f[k("av")] - f[k("v")]) / 6
    torch.testing.assert_close(o["a"], expected_a)
    torch.testing.assert_close(o["a"] + o["t"] + o["v"], f[k("atv")])


def test_coefficients_first_iteration() -> None:
    zero = torch.zeros(2)
    assert agm_coefficients(torch.tensor([1.5, 1.5]), zero, 0.1, 10.0).tolist() == pytest.approx([1.0, 1.0])
    c = agm_coefficients(torch.tensor([1.0, 2.0]), zero, 0.1, 10.0)
    # official: c_a = exp(0.1·(1 − e)), c_v = exp(0.1·(1 − 1/e)); BalanceMM swaps them
    assert c.tolist() == pytest.approx([0.842124, 1.065253], abs=1e-6)


def test_kappa_clamps_the_gap_and_none_does_not() -> None:
    # s = (3, 0): r_a = e^−3, r* = 1, gap_a = 1 − e^−3 ≈ 0.95; with κ = 0.5 the gap is clamped
    scores, running = torch.tensor([3.0, 0.0]), torch.zeros(2)
    c = agm_coefficients(scores, running, 1.0, 0.5)
    assert c[0].item() == pytest.approx(math.exp(0.5))
    assert c[1].item() == pytest.approx(math.exp(1 - math.exp(3)))
    assert agm_coefficients(scores, running, 1.0, None)[0].item() == pytest.approx(math.exp(1 - math.exp(-3)))


def test_three_modality_ratios_use_the_m_over_m_minus_1_factor() -> None:
    s = torch.tensor([1.0, 2.0, 3.0])
    c = agm_coefficients(s, torch.zeros(3), 1.0, None)
    r = [math.exp(1.5 * (2.0 - x)) for x in (1.0, 2.0, 3.0)]
    assert c.tolist() == pytest.approx([math.exp(1 - x) for x in r])


def test_scores_clamp_the_true_class_probability() -> None:
    o = {"a": torch.tensor([[0.0, 0.0]]), "v": torch.tensor([[-100.0, 100.0]])}
    s = agm_scores(o, torch.tensor([0]))
    assert s.tolist() == pytest.approx([math.log(2), -math.log(1e-8)])


def test_coefficients_reshape_the_coalition_gradients() -> None:
    # ∂L/∂f(av) = ½(c_a + c_v)g, ∂L/∂f(a) = ½(c_a − c_v)g, ∂L/∂f(v) = ½(c_v − c_a)g
    fused = {s: torch.randn(4, 3, requires_grad=True) for s in (AV, A, V)}
    g = torch.randn(4, 3)
    c = torch.tensor([0.8, 1.3])
    (modulated_sum(mono_outputs(fused, ("a", "v")), c) * g).sum().backward()
    torch.testing.assert_close(fused[AV].grad, 0.5 * (0.8 + 1.3) * g)
    torch.testing.assert_close(fused[A].grad, 0.5 * (0.8 - 1.3) * g)
    torch.testing.assert_close(fused[V].grad, 0.5 * (1.3 - 0.8) * g)


def _method(num_modalities: int = 2, **hp: object) -> tuple[object, Batch]:
    data = TinyDataset(num_modalities)
    model = tiny_model(data)
    method = create_method("agm", model, RunContext(data.modalities), **hp)
    return method, first_batch(data)


def test_shared_passes_equal_the_official_per_coalition_passes() -> None:
    method, batch = _method()
    model = method.model
    torch.manual_seed(0)
    out = method.forward(batch)
    model.eval()
    with torch.no_grad():
        f_a = model(zero_padded(batch, frozenset({"audio"}))).logits
        f_v = model(zero_padded(batch, frozenset({"visual"}))).logits
    model.train()
    f_av = out.logits.detach()  # Σ o_m equals the train-mode f(M)
    torch.testing.assert_close(out.unimodal_logits["audio"].detach(), 0.5 * (f_av - f_v + f_a))
    torch.testing.assert_close(out.unimodal_logits["visual"].detach(), 0.5 * (f_av - f_a + f_v))


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_shared_passes_give_the_official_passes_values_and_gradients(num_modalities: int) -> None:
    coeffs = torch.tensor([0.7, 1.4, 1.1][:num_modalities])
    grads, outputs = [], []
    for passes in ("official", "shared"):
        method, batch = _method(num_modalities, passes=passes)
        o = method.forward(batch).unimodal_logits
        F.cross_entropy(modulated_sum(o, coeffs), batch.label).backward()
        outputs.append({m: x.detach() for m, x in o.items()})
        grads.append({n: p.grad.clone() for n, p in method.model.named_parameters()})
    for m in outputs[0]:
        torch.testing.assert_close(outputs[1][m], outputs[0][m], rtol=1e-5, atol=1e-6)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_equal_coefficients_scale_the_plain_gradient(num_modalities: int) -> None:
    # With c_m = c for all m the padded passes get zero gradient, so every parameter's gradient is
    # c × the gradient of plain CE(f(M), y).
    method, batch = _method(num_modalities)
    model = method.model
    o = method.forward(batch).unimodal_logits
    c = 1.7
    coeffs = torch.full((num_modalities,), c)
    F.cross_entropy(modulated_sum(o, coeffs), batch.label).backward()
    agm = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(batch).logits, batch.label).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(agm[n], c * p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_running_scores_are_a_cumulative_mean_over_iterations() -> None:
    method, batch = _method()
    seen = []
    for _ in range(3):
        out = method.forward(batch)
        seen.append(agm_scores({m: o.detach() for m, o in out.unimodal_logits.items()}, batch.label))
    torch.testing.assert_close(method.running, torch.stack(seen).mean(0))
    assert method.iteration.item() == 3


def test_window_before_start_tracks_scores_without_modulating_and_after_end_is_plain() -> None:
    method, batch = _method(modulation_starts=1, modulation_ends=2)
    method.ctx.epoch = 0
    method.forward(batch)
    logs = method.ctx.pop_logs()
    assert "agm/s_audio" in logs and "agm/c_audio" not in logs
    method.ctx.epoch = 3
    out = method.forward(batch)
    assert out.unimodal_logits == {} and method.iteration.item() == 1 and not method.ctx.pop_logs()


def test_clip_rule_follows_the_fusion_weight_gradient() -> None:
    method, batch = _method(clip_threshold=1.0, clip_norm=1.0)
    params = method.trainable_parameters()
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    method.after_backward(None, batch)  # type: ignore[arg-type]
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)  # every entry within [−1, 1]
    method.model.fusion.fc_out.weight.grad[0, 0] = 2.0
    method.after_backward(None, batch)  # type: ignore[arg-type]
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert total.item() == pytest.approx(1.0, rel=1e-5)


def _step(method: Method, epoch: int, batch: Batch) -> dict[str, torch.Tensor]:
    """One training step's forward and backward in ``epoch``: every parameter's gradient, by name."""
    method.ctx.epoch = epoch
    method.zero_grad()
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    return {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}


def _plain_gradients(method: Method, batch: Batch) -> dict[str, torch.Tensor]:
    model = method.model
    model.zero_grad()
    F.cross_entropy(model(batch).logits, batch.label).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_keeps_scaling_by_the_last_in_window_coefficients(monkeypatch: pytest.MonkeyPatch) -> None:
    # The official hooks on o_m keep the scale of the window's last step (model/CREMAD_net.py 39–55,
    # run/CREMAD_main.py 159–166 and 232). Scores are fixed so that the coefficients are known:
    #   epoch 0 (in the window, first iteration, S̄ = 0 so r* = 1), s = (1, 2), α = 0.1:
    #     r_a = exp(2·(1.5 − 1)) = e, r_v = exp(2·(1.5 − 2)) = 1/e,
    #     c_a = exp(0.1·(1 − e)) = exp(−0.1718282) = 0.842124, c_v = exp(0.1·(1 − 1/e)) = 1.065253.
    #   epoch 1 (after the window), s = (2, 1): fresh coefficients would be c_a = exp(0.1·(e − 1/e))
    #     = 1.264960 and c_v = exp(−0.1·(e − 1/e)) = 0.790539 (S̄ = (1, 2)); the official code keeps
    #     0.842124 and 1.065253.
    # The fusion head's output bias is added to every coalition's logits, so its gradient is
    # Σ_S ∂L/∂f(S) = [½(c_a + c_v) + ½(c_a − c_v) + ½(c_v − c_a)]·g = ½(c_a + c_v)·g, g the plain
    # CE gradient: 0.953688 × the plain bias gradient (fresh coefficients: 1.027749; plain CE: 1).
    scores = iter([torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])])
    monkeypatch.setattr(agm_module, "agm_scores", lambda outputs, label, mean: next(scores))
    data = TinyDataset()
    method = build_method("agm", data, alpha=0.1, modulation_ends=0, after_window="frozen")
    batch = first_batch(data)
    _step(method, 0, batch)
    assert method.coefficients.tolist() == pytest.approx([0.842124, 1.065253], abs=1e-6)
    method.ctx.pop_logs()
    grads = _step(method, 1, batch)
    assert method.coefficients.tolist() == pytest.approx([0.842124, 1.065253], abs=1e-6)
    assert float(method.ctx.pop_logs()["agm/c_visual"]) == pytest.approx(1.065253, abs=1e-6)
    assert method.iteration.item() == 2  # the coalition passes and running averages go on
    plain = _plain_gradients(method, batch)["fusion.fc_out.bias"]
    torch.testing.assert_close(grads["fusion.fc_out.bias"], 0.953688 * plain, rtol=1e-5, atol=1e-7)


def test_default_trains_plain_cross_entropy_after_the_window() -> None:
    assert AGMHParams().after_window == "plain"
    data = TinyDataset()
    method = build_method("agm", data, modulation_ends=0)
    batch = first_batch(data)
    _step(method, 0, batch)
    modulated = method.coefficients.clone()
    grads = _step(method, 1, batch)
    assert method.iteration.item() == 1 and torch.equal(method.coefficients, modulated)
    for name, g in _plain_gradients(method, batch).items():
        torch.testing.assert_close(grads[name], g, msg=name)


@pytest.mark.parametrize(
    ("hp", "active"),
    [
        ({"modulation_starts": 1, "modulation_ends": 2}, {1, 2}),
        ({"modulation_starts": 1, "modulation_ends": 2, "after_window": "frozen"}, {1, 2, 3, 4, 5}),
        # "50%" of 6 is 3 > 2: the window is empty, the coefficients stay 1 and never act
        ({"modulation_starts": "50%", "modulation_ends": 2, "after_window": "frozen"}, set()),
    ],
)
def test_frozen_coefficients_act_to_the_end_unless_the_window_is_empty(hp: dict[str, object], active: set[int]) -> None:
    method = build_method("agm", TinyDataset(), **hp)
    method.ctx.num_epochs = 6
    assert {e for e in range(6) if method.acts_in(e)} == active


def test_an_empty_window_leaves_frozen_training_plain() -> None:
    data = TinyDataset()
    method = build_method("agm", data, modulation_starts="50%", modulation_ends=1, after_window="frozen")
    method.ctx.num_epochs = 4
    batch = first_batch(data)
    grads = _step(method, 3, batch)
    assert method.coefficients.tolist() == [1.0, 1.0] and "agm/c_audio" not in method.ctx.pop_logs()
    for name, g in _plain_gradients(method, batch).items():
        torch.testing.assert_close(grads[name], g, msg=name)


def test_frozen_coefficients_are_checkpointed() -> None:
    data = TinyDataset()
    batch = first_batch(data)
    method = build_method("agm", data, modulation_ends=0, after_window="frozen")
    _step(method, 0, batch)
    resumed = build_method("agm", data, modulation_ends=0, after_window="frozen")
    resumed.load_state_dict(method.state_dict())
    assert not torch.equal(method.coefficients, torch.ones(2))
    assert torch.equal(resumed.coefficients, method.coefficients)
    after, after_resumed = _step(method, 1, batch), _step(resumed, 1, batch)
    for name, g in after.items():
        torch.testing.assert_close(after_resumed[name], g, msg=name)


def test_default_window_is_the_official_twenty_epochs() -> None:
    # The official loop runs epochs 1..EPOCHS (run/CREMAD_main.py 611, 635) and modulates when
    # 0 ≤ epoch ≤ 20 (159): epochs 1, 2, …, 20, twenty of them, which are 0, 1, …, 19 counted from 0.
    data = TinyDataset()
    method = build_method("agm", data)
    method.ctx.num_epochs = 30
    assert {e for e in range(30) if method.acts_in(e)} == set(range(20))
    batch = first_batch(data)
    for epoch, modulated in ((19, True), (20, False)):
        method.ctx.epoch = epoch
        out = method.forward(batch)
        assert ("agm/c_audio" in method.ctx.pop_logs()) == modulated
        assert bool(out.unimodal_logits) == modulated


# -- data-parallel runs -------------------------------------------------------------------------


def test_scores_of_shards_with_a_global_mean_are_the_whole_batchs() -> None:
    g = torch.Generator().manual_seed(0)
    o = {"a": torch.randn(5, 3, generator=g), "v": torch.randn(5, 3, generator=g)}
    label = torch.tensor([0, 2, 1, 1, 0])

    def rows_of(lo: int, hi: int) -> list[torch.Tensor]:
        """The per-row values ``[B]`` that the scores of rows lo:hi average, one per modality."""
        seen: list[torch.Tensor] = []
        agm_scores({m: x[lo:hi] for m, x in o.items()}, label[lo:hi], lambda t: seen.append(t) or t.mean(0))
        return seen

    def global_mean_with(other: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """ctx.global_mean on a rank whose peer holds ``other``: a mean over both, [1] as on two ranks."""
        others = iter(other)
        return lambda t: torch.cat([t, next(others)]).mean(0, keepdim=True)

    for (lo, hi), other in (((0, 3), rows_of(3, 5)), ((3, 5), rows_of(0, 3))):  # two ranks: 3 + 2 rows
        shard = agm_scores({m: x[lo:hi] for m, x in o.items()}, label[lo:hi], global_mean_with(other))
        torch.testing.assert_close(shard, agm_scores(o, label), rtol=0, atol=1e-6)


def test_the_scores_and_coefficients_come_from_the_global_batchs_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = _method(alpha=0.1)
    means = iter([torch.tensor([-1.0]), torch.tensor([-2.0])])  # the global batch's mean log-probabilities
    seen: list[torch.Tensor] = []

    def global_mean(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return next(means)

    monkeypatch.setattr(method.ctx, "global_mean", global_mean)
    method.forward(batch)
    assert [tuple(t.shape) for t in seen] == [(len(batch),)] * 2  # per-row values, one call per modality
    assert method.running.tolist() == [1.0, 2.0]  # s = (1, 2), whatever this shard's own scores are
    assert method.coefficients.tolist() == pytest.approx([0.842124, 1.065253], abs=1e-6)  # as by hand above
