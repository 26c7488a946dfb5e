"""MMPareto against numbers computed by hand from its equations (docs/methods/mmpareto.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from balancemm.methods import create_method, mmpareto
from balancemm.methods.mmpareto import MMPareto, pareto_combine, pareto_direction
from tests.conftest import TinyDataset, first_batch, tiny_model, tiny_spec


def test_conflict_case() -> None:
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0])
    a1, a2 = pareto_direction(g_mm, g_u)
    assert a1 == pytest.approx(0.53846, abs=1e-5) and a2 == pytest.approx(0.46154, abs=1e-5)
    d = a1 * g_mm + a2 * g_u
    torch.testing.assert_close(d, torch.tensor([0.30769, 0.46154]), atol=1e-5, rtol=0)
    assert float(d @ g_mm) == pytest.approx(float(d @ d)) == pytest.approx(float(d @ g_u))
    (final,), _ = pareto_combine([g_mm], [g_u], gamma=1.5)
    # ‖2d‖ = 1.1094 < ‖g_mm + g_u‖ = 1.1180 → r = 1.00778; 1.5 · r · 2d = (0.9303, 1.3954)
    torch.testing.assert_close(final, torch.tensor([0.9303, 1.3954]), atol=1e-4, rtol=0)
    assert float(final @ g_mm) == pytest.approx(0.9303, abs=1e-4) and float(final @ g_u) > 0


def test_aligned_case_is_gamma_times_the_sum() -> None:
    (final,), (a1, a2) = pareto_combine([torch.tensor([1.0, 0.0])], [torch.tensor([0.5, 1.0])], gamma=1.5)
    assert (a1, a2) == (0.5, 0.5)
    torch.testing.assert_close(final, torch.tensor([2.25, 1.5]))
    assert float(final @ torch.tensor([1.0, 0.0])) == 2.25 and float(final @ torch.tensor([0.5, 1.0])) == 2.625


def test_direction_never_conflicts_with_either_objective() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        g_mm, g_u = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
        a1, a2 = pareto_direction(g_mm, g_u)
        d = 2 * (a1 * g_mm + a2 * g_u)
        assert float(d @ g_mm) >= -1e-6 and float(d @ g_u) >= -1e-6


def _run_backward(data: TinyDataset) -> tuple[object, dict[str, torch.Tensor]]:
    method = create_method("mmpareto", tiny_model(data))
    batch = first_batch(data)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    method.backward(losses)
    return method, losses


def test_orthogonal_gradients_count_as_a_conflict() -> None:
    # The rule is cos > 0 → (½, ½); cos = 0 is not > 0, so orthogonal gradients take the min-norm weights.
    # g_mm = (1, 0), g_u = (0, 2): a = ‖g_mm‖² = 1, c = ‖g_u‖² = 4, e = ⟨g_mm, g_u⟩ = 0
    # → α₁ = (c − e)/(a + c − 2e) = 4/5, α₂ = 1/5 (cos ≥ 0 would give ½, ½; equal norms would hide it).
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    a1, a2 = pareto_direction(g_mm, g_u)
    assert (a1, a2) == pytest.approx((0.8, 0.2), abs=1e-12)
    # candidate 2(0.8·g_mm + 0.2·g_u) = (1.6, 0.8), ‖·‖ = √3.2; ‖g_mm + g_u‖ = √5 → r = √(5/3.2) = 1.25
    # final = 1.5 · 1.25 · (1.6, 0.8) = (3.0, 1.5)   [the ½, ½ rule: 1.5 · (1, 2) = (1.5, 3.0)]
    (final,), _ = pareto_combine([g_mm], [g_u], gamma=1.5)
    torch.testing.assert_close(final, torch.tensor([3.0, 1.5]))


def test_backward_gives_each_encoder_its_hand_computed_gradient_and_the_rest_the_plain_sum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ctx.grad is replaced by gradients chosen by hand, so every number below is worked out on paper.
    data = TinyDataset()
    method = create_method("mmpareto", tiny_model(data))
    model = method.model
    audio = [p for p in model.modality_parameters("audio") if p.requires_grad]
    visual = [p for p in model.modality_parameters("visual") if p.requires_grad]
    rest = [p for p in method.trainable_parameters() if all(p is not q for q in audio + visual)]
    assert len(audio) == len(visual) == 6 and rest

    def table(kind: str) -> dict[int, torch.Tensor]:
        g = {id(p): torch.zeros_like(p) for p in audio + visual}
        # audio: g_mm = 1 in the first element of its first tensor, g_u = 2 in the first element of its
        # second: orthogonal once concatenated (cos = 0), the case of test_orthogonal_gradients_count_as_a_conflict.
        # visual: g_mm = (1, 0), g_u = (−0.5, 1) in the first two elements of its first tensor (test_conflict_case).
        if kind == "fused":
            g[id(audio[0])].view(-1)[0] = 1.0
            g[id(visual[0])].view(-1)[:2] = torch.tensor([1.0, 0.0])
        else:
            g[id(audio[1])].view(-1)[0] = 2.0
            g[id(visual[0])].view(-1)[:2] = torch.tensor([-0.5, 1.0])
        g.update({id(p): torch.full_like(p, 1.0 if kind == "fused" else 2.0) for p in rest})
        return g

    batch = first_batch(data)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    calls: list[torch.Tensor] = []

    def grad(loss: torch.Tensor, params: list[torch.Tensor], **kwargs: object) -> tuple[torch.Tensor, ...]:
        calls.append(loss)
        g = table("fused" if len(calls) == 1 else "unimodal")
        return tuple(g[id(p)] for p in params)

    monkeypatch.setattr(method.ctx, "grad", grad)
    method.backward(losses)
    # First the fused loss, then Σ_m L_m.
    assert len(calls) == 2 and calls[0] is losses["fused"]
    torch.testing.assert_close(calls[1], losses["uni_audio"] + losses["uni_visual"])
    # audio, α = (0.8, 0.2), per tensor g = γ·max(1, ‖g_mm,P + g_u,P‖/‖g̃_P‖)·g̃_P with g̃_P = 2(α₁g_mm,P + α₂g_u,P):
    #   tensor 0: g̃ = 1.6 at [0], ratio 1/1.6 < 1 → 1.5·1.6 = 2.4;  tensor 1: g̃ = 0.8 at [0], ratio 2/0.8 = 2.5
    #   → 1.5·2.5·0.8 = 3.0;  the other tensors: g̃ = 0 → 0.
    expected_audio = [torch.zeros_like(p) for p in audio]
    expected_audio[0].view(-1)[0] = 2.4
    expected_audio[1].view(-1)[0] = 3.0
    # visual, α₁ = (1.25 + 0.5)/(1 + 1.25 + 1) = 7/13: g̃ = 2(7/13·(1, 0) + 6/13·(−0.5, 1)) = (8, 12)/13,
    # ‖g̃‖ = 4√13/13, ‖g_mm + g_u‖ = √1.25 → g = 1.5·√1.25·13/(4√13)·(8, 12)/13 = 1.5·√(1.25/13)·(2, 3).
    expected_visual = [torch.zeros_like(p) for p in visual]
    expected_visual[0].view(-1)[:2] = 1.5 * math.sqrt(1.25 / 13) * torch.tensor([2.0, 3.0])
    for p, e in zip(audio + visual, expected_audio + expected_visual, strict=True):
        torch.testing.assert_close(p.grad, e)
    for p in rest:  # heads: the plain sum 1 + 2
        torch.testing.assert_close(p.grad, torch.full_like(p, 3.0))
    logs = method.ctx.pop_logs()
    assert logs["mmpareto/alpha_mm_audio"] == pytest.approx(0.8, abs=1e-12)
    assert logs["mmpareto/alpha_mm_visual"] == pytest.approx(7 / 13, abs=1e-12)


def test_the_rule_receives_the_true_per_loss_gradients_of_each_encoder(
    tiny: TinyDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What reaches the combination rule, encoder by encoder, is ∇L_mm and ∇Σ_m L_m from autograd, two
    # different gradients (BalanceMM accumulates them into one), and the heads keep the plain sum.
    seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    real = mmpareto.pareto_combine

    def spy(g_mm: list[torch.Tensor], g_u: list[torch.Tensor], gamma: float) -> object:
        seen.append(([g.clone() for g in g_mm], [g.clone() for g in g_u]))
        return real(g_mm, g_u, gamma)

    monkeypatch.setattr(mmpareto, "pareto_combine", spy)
    method, _ = _run_backward(tiny)
    model = method.model  # type: ignore[attr-defined]
    batch = first_batch(tiny)
    params = list(model.parameters())
    out = model(batch)
    l_mm = F.cross_entropy(out.logits, batch.label)
    l_u = sum(F.cross_entropy(out.unimodal_logits[m], batch.label) for m in tiny.modalities)
    g_mm = dict(
        zip(map(id, params), torch.autograd.grad(l_mm, params, retain_graph=True, allow_unused=True), strict=True)
    )
    g_u = dict(zip(map(id, params), torch.autograd.grad(l_u, params, allow_unused=True), strict=True))
    assert len(seen) == len(tiny.modalities)
    for m, (got_mm, got_u) in zip(tiny.modalities, seen, strict=True):
        enc = list(model.modality_parameters(m))
        ref_mm = [g_mm[id(p)] if g_mm[id(p)] is not None else torch.zeros_like(p) for p in enc]
        ref_u = [g_u[id(p)] if g_u[id(p)] is not None else torch.zeros_like(p) for p in enc]
        assert any(not torch.allclose(a, b) for a, b in zip(ref_mm, ref_u, strict=True))
        for a, b in zip(got_mm + got_u, ref_mm + ref_u, strict=True):
            torch.testing.assert_close(a, b)
    for p in model.head_parameters():
        a, b = g_mm[id(p)], g_u[id(p)]
        torch.testing.assert_close(p.grad, (a if a is not None else 0) + (b if b is not None else 0))


def test_exactly_two_backward_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.autograd.grad

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.autograd, "grad", counting)
    _run_backward(TinyDataset(3))
    assert len(calls) == 2


def test_separate_heads_by_default_and_slices_on_request() -> None:
    spec = tiny_spec(TinyDataset())
    assert MMPareto.model_spec(spec, MMPareto.HParams()).unimodal_heads == "linear"
    assert MMPareto.model_spec(spec, MMPareto.HParams(heads="slice")).unimodal_heads == "slice"
