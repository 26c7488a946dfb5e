"""CGGM against numbers computed by hand from its equations (docs/methods/cggm.md)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.methods import create_method
from balancemm.methods.cggm import CGGM, alignment_head_grads, alignment_term, cggm_coefficients, head_blocks
from balancemm.models import build_model
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec

F64 = torch.float64


def _b(acc: list[float], prev: list[float]) -> list[float]:
    return cggm_coefficients(torch.tensor(acc, dtype=F64), torch.tensor(prev, dtype=F64)).tolist()


# -- the hand-computed numbers ---------------------------------------------------------------------


def test_coefficients_for_three_modalities() -> None:
    # Δ = (0.05, 0.10, 0.02), S = 0.17 + 1e-8, B_m = (S − Δ_m)/S
    b = torch.tensor(_b([0.55, 0.50, 0.32], [0.50, 0.40, 0.30]), dtype=F64)
    assert b.tolist() == pytest.approx([0.705882, 0.411765, 0.882353], abs=1e-6)
    assert float(b.sum()) == pytest.approx(2.000000, abs=1e-6)  # Σ B = M − 1
    assert (1.3 * b).tolist() == pytest.approx([0.917647, 0.535294, 1.147059], abs=1e-6)


def test_degenerate_coefficients_for_two_modalities() -> None:
    # Δ = (0.02, −0.01): S = 0.01 + 1e-8, so B_1 < 0 flips the first encoder's gradient
    assert _b([0.52, 0.49], [0.5, 0.5]) == pytest.approx([-0.999998, 1.999999], abs=1e-6)
    assert _b([0.5, 0.5], [0.5, 0.5]) == pytest.approx([1.0, 1.0], abs=1e-12)  # Δ = 0: S = 1e-8, B = 1
    assert _b([0.6, 0.2], [0.0, 0.0]) == pytest.approx([0.25, 0.75], abs=1e-6)  # first step, a^prev = 0


def test_alignment_term_value_and_head_gradient() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64, requires_grad=True)
    u1 = torch.tensor([[1.0, 0.5], [0.0, 1.0], [0.5, 0.5]], dtype=F64)
    u2 = torch.tensor([[-1.0, 0.0], [0.5, 1.0], [1.0, -0.5]], dtype=F64)
    b = torch.tensor([0.25, 0.75], dtype=F64)
    cos = [float(F.cosine_similarity(u.flatten(), w.detach().flatten(), dim=0)) for u in (u1, u2)]
    assert cos == pytest.approx([0.904534, 0.133631], abs=1e-6)
    # the code's single fused out_layer is compared with every classifier: W_m = W_f for both
    loss = alignment_term(b, [u1, u2], [w, w])
    assert float(loss.detach()) == pytest.approx(0.336822, abs=1e-6)
    loss.backward()
    expected = [[0.103329, -0.018844], [-0.050111, -0.097117], [-0.078273, 0.072062]]
    assert w.grad is not None
    assert w.grad.flatten().tolist() == pytest.approx([x for row in expected for x in row], abs=1e-6)
    # the closed form used by align_at=previous gives the same gradient
    closed = alignment_head_grads(b, [u1, u2], [w.detach(), w.detach()])
    torch.testing.assert_close(closed[0] + closed[1], w.grad, rtol=0, atol=1e-12)


def test_a_negative_coefficient_counts_by_its_magnitude() -> None:
    # B = (−0.5, 1.5) with the cosines above: ℓ = (|−0.5| + |1.5| − (−0.5·0.904534 + 1.5·0.133631))/2
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    u1 = torch.tensor([[1.0, 0.5], [0.0, 1.0], [0.5, 0.5]], dtype=F64)
    u2 = torch.tensor([[-1.0, 0.0], [0.5, 1.0], [1.0, -0.5]], dtype=F64)
    loss = alignment_term(torch.tensor([-0.5, 1.5], dtype=F64), [u1, u2], [w, w])
    assert float(loss) == pytest.approx(1.125910, abs=1e-6)


def test_before_any_step_the_alignment_is_zero_with_zero_gradient() -> None:
    zero = [torch.zeros(3, 2, dtype=F64)] * 2
    w = torch.ones(3, 2, dtype=F64)
    b = torch.zeros(2, dtype=F64)
    assert float(alignment_term(b, zero, [w, w])) == 0.0
    assert all(not g.any() and torch.isfinite(g).all() for g in alignment_head_grads(b, zero, [w, w]))


# -- the method on the tiny model ------------------------------------------------------------------


def _stepped(method: Any, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One template step without the run's optimiser step: the losses, and the gradients the run's
    optimiser would apply (the classifiers have stepped by then)."""
    method.zero_grad(set_to_none=True)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    method.backward(losses)
    method.after_backward(out, batch)
    grads = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}
    return losses, grads


def _reference_step(
    method: Any, batch: Batch
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """From copies, before the method's step: the plain gradients of CE + λ·align, the classifiers'
    accuracies a ``[M]`` on the detached features, and the gradients of L_cls for the classifiers."""
    mods = method.model.modalities
    model, classifiers = copy.deepcopy(method.model), copy.deepcopy(method.classifiers)
    out = model(batch)
    blocks = head_blocks(model)
    stored = [getattr(method, f"cls_weight_prev_{m}") for m in mods]
    align = alignment_term(method.coeff_prev, stored, [blocks[m] for m in mods])
    (F.cross_entropy(out.logits, batch.label) + method.hp.lam * align).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    logits = {m: classifiers[m](out.features[m].detach()) for m in mods}
    acc = torch.stack([(logits[m].argmax(1) == batch.label).double().mean() for m in mods])
    sum(F.cross_entropy(logits[m], batch.label) for m in mods).backward()
    cls_grads = {n: p.grad.clone() for n, p in classifiers.named_parameters()}
    return plain, {"align": align}, acc, cls_grads


def _encoder_of(name: str, mods: tuple[str, ...]) -> str | None:
    return next((m for m in mods if name.startswith(f"encoders.{m}.")), None)


def test_encoder_gradients_are_scaled_by_rho_b_from_the_classifiers_accuracy_gains() -> None:
    data = TinyDataset()
    method = build_method("cggm", data, rho=1.3)
    mods = method.model.modalities
    batches = [first_batch(data), first_batch(data, n=12)]
    for step, batch in enumerate(batches):
        acc_prev = method.acc_prev.clone()
        plain, _, acc, _ = _reference_step(method, batch)
        losses, grads = _stepped(method, batch)
        b = cggm_coefficients(acc, acc_prev)
        torch.testing.assert_close(method.coeff_prev, b)
        torch.testing.assert_close(method.acc_prev, acc)
        for name, g in grads.items():
            m = _encoder_of(name, mods)
            factor = float(1.3 * b[mods.index(m)]) if m is not None else 1.0
            torch.testing.assert_close(g, plain[name] * factor, msg=f"step {step} {name}")
        if step == 0:
            assert float(losses["align"].detach()) == 0.0  # no B, U of a previous step yet
        method.ctx.optimizer_step()


def test_alignment_uses_the_previous_step_b_and_u_against_the_current_head() -> None:
    data = TinyDataset()
    method = build_method("cggm", data, lam=0.2)
    batch = first_batch(data)
    _stepped(method, batch)
    b_prev = method.coeff_prev.clone()
    u_prev = {m: method.classifiers[m].out.weight.detach().clone() for m in method.model.modalities}
    method.ctx.optimizer_step()  # the head moves; U^prev stays what it was before the classifiers' step
    losses, _ = _stepped(method, batch)
    for m in method.model.modalities:
        assert not torch.equal(method.classifiers[m].out.weight, getattr(method, f"cls_weight_prev_{m}"))
    blocks = head_blocks(method.model)
    mods = method.model.modalities
    by_hand = torch.stack([F.cosine_similarity(u_prev[m].flatten(), blocks[m].detach().flatten(), dim=0) for m in mods])
    expected = 0.2 * (b_prev.abs().sum() - (b_prev * by_hand.double()).sum()) / len(mods)
    assert float(losses["align"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses["align"].detach()) != 0.0


def test_alignment_at_the_previous_head_reproduces_the_code() -> None:
    # align_at=previous: value and gradient of ℓ_gm at the head stored at the step that built it
    data = TinyDataset()
    method = build_method("cggm", data, align_at="previous", lam=1.0)
    batch = first_batch(data)
    _stepped(method, batch)
    mods = method.model.modalities
    w_prev = [getattr(method, f"head_weight_prev_{m}").clone() for m in mods]
    u_prev = [getattr(method, f"cls_weight_prev_{m}").clone() for m in mods]
    torch.testing.assert_close(w_prev, [head_blocks(method.model)[m].detach() for m in mods])
    method.ctx.optimizer_step()
    method.zero_grad(set_to_none=True)
    value = method.alignment()
    assert float(value.detach()) == pytest.approx(float(alignment_term(method.coeff_prev, u_prev, w_prev)), rel=1e-6)
    value.backward()
    fc = method.model.fusion.fc_out.weight
    expected = torch.cat(alignment_head_grads(method.coeff_prev, u_prev, w_prev), dim=1)
    torch.testing.assert_close(fc.grad, expected)
    assert not torch.allclose(w_prev[0], head_blocks(method.model)[mods[0]].detach())  # the head did move


def test_classifiers_learn_only_from_their_own_loss_and_send_nothing_to_the_encoders() -> None:
    data = TinyDataset()
    method = build_method("cggm", data)
    batch = first_batch(data)
    _stepped(method, batch)  # from the second step on, ℓ_gm is non-zero and reads the classifiers' U
    method.ctx.optimizer_step()
    seen: dict[str, torch.Tensor] = {}
    real = method.ctx.optimizer_step

    def spy(optimizer: Any = None) -> None:
        if optimizer is method.cls_optimizer:  # the classifiers' gradients as they are stepped
            seen.update({n: p.grad.clone() for n, p in method.classifiers.named_parameters()})
        real(optimizer)

    method.ctx.optimizer_step = spy  # type: ignore[method-assign]
    _, terms, _, cls_grads = _reference_step(method, batch)
    assert float(terms["align"].detach()) != 0.0
    _stepped(method, batch)
    assert seen.keys() == cls_grads.keys()
    for name, g in cls_grads.items():
        torch.testing.assert_close(seen[name], g, msg=name)
    # the run's optimiser never holds the classifiers; the classifiers' optimiser holds nothing else
    main = {id(p) for g in method.ctx.optimizer.param_groups for p in g["params"]}
    aux = {id(p) for p in method.classifiers.parameters()}
    assert not main & aux and main | aux == {id(p) for p in method.parameters()}
    assert {id(p) for g in method.cls_optimizer.param_groups for p in g["params"]} == aux
    assert all(g["lr"] == method.hp.cls_lr for g in method.cls_optimizer.param_groups)


def test_head_gradients_are_those_of_ce_and_the_alignment_unscaled() -> None:
    data = TinyDataset(3)
    method = build_method("cggm", data)
    batch = first_batch(data)
    _stepped(method, batch)
    method.ctx.optimizer_step()
    plain, _, _, _ = _reference_step(method, batch)
    _, grads = _stepped(method, batch)
    for name in ("fusion.fc_out.weight", "fusion.fc_out.bias"):
        torch.testing.assert_close(grads[name], plain[name])


def test_accuracies_are_the_global_batch_s() -> None:
    # Another rank's shard of 8 rows, all classified correctly by every classifier: a_m = (c_m + 8)/16.
    data = TinyDataset()
    method = build_method("cggm", data)
    batch = first_batch(data)
    _, _, acc, _ = _reference_step(method, batch)
    method.ctx.all_sum = lambda t: t + torch.full_like(t, 8.0)  # type: ignore[method-assign]
    _stepped(method, batch)
    torch.testing.assert_close(method.acc_prev, (acc * 8 + 8) / 16)


def test_hidden_twice_applies_the_first_linear_twice() -> None:
    data = TinyDataset()
    method = build_method("cggm", data, hidden_twice=True)
    f = method.classifiers["audio"]
    h = torch.randn(5, f.hidden.in_features)
    torch.testing.assert_close(f(h), f.out(F.relu(f.hidden(f.hidden(h)))))
    plain = build_method("cggm", data).classifiers["audio"]
    torch.testing.assert_close(plain(h), plain.out(F.relu(plain.hidden(h))))


def test_clamp_bounds_the_coefficients() -> None:
    data = TinyDataset()
    method = build_method("cggm", data, clamp=1.5)
    method.acc_prev.copy_(torch.tensor([0.9, 0.0], dtype=F64))  # Δ_audio very negative: unclamped B < 0
    raw = cggm_coefficients(_reference_step(method, first_batch(data))[2], method.acc_prev.clone())
    _stepped(method, first_batch(data))
    torch.testing.assert_close(method.coeff_prev, raw.clamp(0.0, 1.5))
    assert float(raw.min()) < 0 or float(raw.max()) > 1.5  # the clamp did something


def test_sum_fusion_aligns_with_each_modality_s_own_linear() -> None:
    data = TinyDataset()
    model = build_model(CGGM.model_spec(tiny_spec(data, fusion="sum"), CGGM.HParams()))
    blocks = head_blocks(model)
    assert all(blocks[m] is model.fusion.fc[m].weight for m in data.modalities)
    with pytest.raises(ConfigError, match="concat or sum"):
        CGGM.model_spec(tiny_spec(data, fusion="shared"), CGGM.HParams())


def test_a_checkpoint_resumes_the_classifiers_and_their_optimiser_exactly() -> None:
    data = TinyDataset(3)
    batches = [first_batch(data), first_batch(data, n=12), first_batch(data, n=10)]
    whole = build_method("cggm", data, clamp=2.0)
    whole.on_fit_start()
    for batch in batches[:2]:
        whole.training_step(batch)
    state = copy.deepcopy(whole.state_dict())
    main_state = copy.deepcopy(whole.ctx.optimizer.state_dict())
    assert any(k.startswith("cls_optimizer.") for k in state)  # the momentum of the classifiers' SGD
    whole.training_step(batches[2])
    resumed = build_method("cggm", data, clamp=2.0)
    resumed.load_state_dict(state)  # before on_fit_start: kept until the optimiser exists
    resumed.on_fit_start()
    resumed.ctx.optimizer.load_state_dict(main_state)
    resumed.training_step(batches[2])
    after, expected = resumed.state_dict(), whole.state_dict()
    assert after.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(after[key], value), key


def test_three_modalities_and_create_method() -> None:
    data = TinyDataset(3)
    method = build_method("cggm", data)
    _stepped(method, first_batch(data))
    assert method.coeff_prev.shape == (3,)
    assert float(method.coeff_prev.sum()) == pytest.approx(2.0, abs=1e-6)  # Σ B = M − 1
    from tests.conftest import tiny_model

    standalone = create_method("cggm", tiny_model(data), lam=0.05)
    assert standalone.hp.lam == 0.05 and set(standalone.classifiers) == set(data.modalities)


# -- for the registry-wide contract (tests/methods/test_all_methods.py) ----------------------------


def contract_cggm(data: TinyDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """First step: a^prev = 0, so B_m = (S − a_m)/S with S = Σ a + 1e-8 from the classifiers' accuracies on
    the detached features; every gradient of encoder m is ρ B_m times the plain CE gradient, the head's is
    plain, ℓ_gm is 0, and the classifiers (not the run's optimiser) have taken their step."""
    batch = first_batch(data)
    method = build_method("cggm", data, rho=1.3)
    mods = method.model.modalities
    model, classifiers = copy.deepcopy(method.model), copy.deepcopy(method.classifiers)
    out = model(batch)
    F.cross_entropy(out.logits, batch.label).backward()
    plain = {f"model.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        acc = torch.stack([(classifiers[m](out.features[m]).argmax(1) == batch.label).double().mean() for m in mods])
    total = acc.sum() + 1e-8
    b = (total - acc) / total
    before = {n: p.detach().clone() for n, p in method.classifiers.named_parameters()}
    method.zero_grad(set_to_none=True)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    assert set(losses) == {"ce", "align"} and float(losses["align"].detach()) == 0.0
    method.backward(losses)
    method.after_backward(out, batch)
    for name, p in method.named_parameters():
        if name.startswith("classifiers."):
            assert p.grad is None and not torch.equal(p, before[name.removeprefix("classifiers.")]), name
            continue
        m = next((m for m in mods if name.startswith(f"model.encoders.{m}.")), None)
        factor = 1.3 * float(b[mods.index(m)]) if m is not None else 1.0
        torch.testing.assert_close(p.grad, plain[name] * factor, msg=name)
    assert method.acts_in(0) and method.acts_in(10**6)


@pytest.mark.parametrize("modalities", [2, 3])
def test_contract(modalities: int, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_cggm(TinyDataset(modalities), monkeypatch)
