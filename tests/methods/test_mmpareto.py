"""MMPareto against the spec's hand-computed numbers (specs/methods-objective.md §7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from balancemm.methods import create_method
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


def test_encoder_gradients_follow_the_rule_and_heads_get_the_plain_sum(tiny: TinyDataset) -> None:
    method, _ = _run_backward(tiny)
    model = method.model  # type: ignore[attr-defined]
    batch = first_batch(tiny)
    # Reference gradients from scratch, loss by loss.
    params = list(model.parameters())
    out = model(batch)
    l_mm = F.cross_entropy(out.logits, batch.label)
    l_u = sum(F.cross_entropy(out.unimodal_logits[m], batch.label) for m in tiny.modalities)
    g_mm = dict(
        zip(map(id, params), torch.autograd.grad(l_mm, params, retain_graph=True, allow_unused=True), strict=True)
    )
    g_u = dict(zip(map(id, params), torch.autograd.grad(l_u, params, allow_unused=True), strict=True))
    zero = torch.zeros_like
    for m in tiny.modalities:
        enc = list(model.modality_parameters(m))
        gm = [g_mm[id(p)] if g_mm[id(p)] is not None else zero(p) for p in enc]
        gu = [g_u[id(p)] if g_u[id(p)] is not None else zero(p) for p in enc]
        assert any(not torch.allclose(a, b) for a, b in zip(gm, gu, strict=True))  # anti-regression (BMM bug)
        expected, _ = pareto_combine(gm, gu, gamma=1.5)
        for p, e in zip(enc, expected, strict=True):
            torch.testing.assert_close(p.grad, e)
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
