"""OGM-GE against numbers computed by hand from its equations (docs/methods/ogm_ge.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from balancemm.context import derive_seed
from balancemm.methods import RunContext, create_method
from balancemm.methods.ogm_ge import ogm_coefficients
from tests.conftest import TinyDataset, first_batch, tiny_model


def test_tie_shrinks_the_first_modality_as_the_official_code_does() -> None:
    k = ogm_coefficients(torch.tensor([5.0, 5.0]), alpha=0.1)
    assert k.tolist() == pytest.approx([0.900332, 1.0], abs=1e-6)
    k = ogm_coefficients(torch.tensor([5.0, 5.0]), alpha=0.3)
    assert k.tolist() == pytest.approx([0.708687, 1.0], abs=1e-6)


def test_dominant_second_modality() -> None:
    # s_v = 2·s_a, α = 0.3 → k_v = 1 − tanh(0.6) = 0.462950, k_a = 1
    assert ogm_coefficients(torch.tensor([3.0, 6.0]), 0.3).tolist() == pytest.approx([1.0, 0.462950], abs=1e-6)
    # the continuous (ρ − 1) variant: 1 − tanh(0.3) = 0.708687
    assert ogm_coefficients(torch.tensor([3.0, 6.0]), 0.3, continuous=True).tolist() == pytest.approx(
        [1.0, 0.708687], abs=1e-6
    )
    # dominant first modality: ρ_a = 2 → k_a = 1 − tanh(0.6)
    assert ogm_coefficients(torch.tensor([6.0, 3.0]), 0.3).tolist() == pytest.approx([0.462950, 1.0], abs=1e-6)


def test_three_modalities_use_the_mean_of_the_others() -> None:
    # s = (6, 2, 4): ρ = 6/3 = 2, 2/5 = 0.4, 4/4 = 1 → only the first is shrunk (ρ > 1 strictly)
    k = ogm_coefficients(torch.tensor([6.0, 2.0, 4.0]), 0.3)
    assert k.tolist() == pytest.approx([1 - math.tanh(0.6), 1.0, 1.0], abs=1e-9)


def _step_grads(method_kw: dict, epoch: int = 0, seed: int = 0) -> tuple[dict[str, torch.Tensor], object]:
    data = TinyDataset()
    model = tiny_model(data)
    ctx = RunContext(data.modalities, seed=seed)
    method = create_method("ogm_ge", model, ctx, **method_kw)
    ctx.epoch = epoch
    batch = first_batch(data)
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    method.after_backward(out, batch)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, method


def _plain_grads() -> dict[str, torch.Tensor]:
    data = TinyDataset()
    model = tiny_model(data)
    batch = first_batch(data)
    F.cross_entropy(model(batch).logits, batch.label).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_only_encoder_conv_kernels_change_and_by_the_logged_coefficient() -> None:
    plain = _plain_grads()
    got, method = _step_grads({"ge": False, "alpha": 0.5})
    logs = method.ctx.pop_logs()  # type: ignore[attr-defined]
    for name, g in got.items():
        is_conv = name.startswith("encoders.") and name.endswith(".0.weight")  # Conv is block[0]
        if not is_conv:
            assert torch.equal(g, plain[name]), name  # heads, biases, BN: bit-identical to plain backward
        else:
            modality = name.split(".")[1]
            torch.testing.assert_close(g, plain[name] * logs[f"ogm/k_{modality}"])
    assert min(logs.values()) < 1.0 and max(logs.values()) == 1.0


def test_outside_the_window_gradients_are_plain() -> None:
    plain = _plain_grads()
    got, _ = _step_grads({"modulation_starts": 2, "modulation_ends": 4}, epoch=5)
    assert all(torch.equal(g, plain[n]) for n, g in got.items())


def test_ge_noise_is_k_times_g_plus_the_run_generators_draws_times_std_of_g() -> None:
    # GE: g ← k·g + ε·σ, ε ~ N(0, 1), σ = std(g) + 1e-8 with g the *unmodulated* gradient (unbiased std),
    # for every conv kernel of every modality, the k = 1 one included; ε comes from the run's method
    # generator (seeded derive_seed(seed, "method")), drawn modality by modality in sorted order, kernel by
    # kernel in module order. Rebuild every draw here and compare with what the step left.
    plain = _plain_grads()
    got, method = _step_grads({"ge": True, "alpha": 0.5}, seed=3)
    logs = method.ctx.pop_logs()  # type: ignore[attr-defined]
    k = {m: logs[f"ogm/k_{m}"] for m in ("audio", "visual")}
    assert min(k.values()) < 1.0 == max(k.values())  # one modality shrunk, the other not
    names = {id(p): n for n, p in method.model.named_parameters()}  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(derive_seed(3, "method"))
    checked = []
    for m in ("audio", "visual"):
        for p in method.modulated[m]:  # type: ignore[attr-defined]
            name = names[id(p)]
            g = plain[name]
            eps = torch.randn(g.shape, generator=gen)
            torch.testing.assert_close(got[name], k[m] * g + eps * (g.std() + 1e-8), rtol=1e-6, atol=1e-7)
            checked.append(name)
    assert {n.split(".")[1] for n in checked} == {"audio", "visual"}
    # Everything else is the plain gradient: no noise outside the conv kernels.
    assert all(torch.equal(g, plain[n]) for n, g in got.items() if n not in checked)


def test_ge_noise_reaches_every_modality_and_comes_from_the_run_generator() -> None:
    plain = _plain_grads()
    a, _ = _step_grads({"ge": True}, seed=1)
    b, _ = _step_grads({"ge": True}, seed=1)
    c, _ = _step_grads({"ge": True}, seed=2)
    conv = [n for n in a if n.startswith("encoders.") and n.endswith(".0.weight")]
    assert {n.split(".")[1] for n in conv} == {"audio", "visual"}
    for n in conv:
        assert not torch.allclose(a[n], plain[n])  # noise even where k = 1
        assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n])


def test_weights_filter_picks_every_multi_dimensional_encoder_weight() -> None:
    data = TinyDataset()
    method = create_method("ogm_ge", tiny_model(data), params="weights")
    names = {id(p) for ps in method.modulated.values() for p in ps}
    dims = [p.dim() for p in method.model.encoders.parameters() if id(p) in names]
    assert dims and all(d > 1 for d in dims)


# -- what the mutation run found untested (docs/testing.md) -----------------------------------------
# tanh(0.3) = 0.2913126, tanh(0.6) = 0.5370496.


def test_scores_below_one_keep_their_ratio() -> None:
    # A score is a sum of probabilities over the batch and may be below 1: only exact zeros are guarded.
    assert ogm_coefficients(torch.tensor([0.2, 0.4]), 0.3).tolist() == pytest.approx([1.0, 0.462950], abs=1e-6)


def test_continuous_form_on_the_first_modality_and_with_three_modalities() -> None:
    # ρ_a = 6/3 = 2 > 1 → k_a = 1 − tanh(0.3·(2 − 1)); with three, ρ = s_m / mean of the others = (2, 0.4, 1).
    assert ogm_coefficients(torch.tensor([6.0, 3.0]), 0.3, continuous=True).tolist() == pytest.approx(
        [0.708687, 1.0], abs=1e-6
    )
    assert ogm_coefficients(torch.tensor([6.0, 2.0, 4.0]), 0.3, continuous=True).tolist() == pytest.approx(
        [0.708687, 1.0, 1.0], abs=1e-6
    )


def test_the_step_uses_the_continuous_setting() -> None:
    _, plain_rule = _step_grads({"ge": False, "alpha": 0.5})
    _, continuous = _step_grads({"ge": False, "alpha": 0.5, "continuous": True})
    k_code = min(plain_rule.ctx.pop_logs().values())  # type: ignore[attr-defined]
    k_cont = min(continuous.ctx.pop_logs().values())  # type: ignore[attr-defined]
    rho = math.atanh(1 - k_code) / 0.5  # back from k = 1 − tanh(α·ρ)
    assert k_cont == pytest.approx(1 - math.tanh(0.5 * (rho - 1)), abs=1e-9)


def test_a_zero_gradient_gets_noise_of_std_1e_8() -> None:
    data = TinyDataset()
    model = tiny_model(data)
    ctx = RunContext(data.modalities, seed=4)
    method = create_method("ogm_ge", model, ctx, ge=True)
    batch = first_batch(data)
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    for ps in method.modulated.values():
        for p in ps:
            p.grad.zero_()
    gen = torch.Generator().manual_seed(derive_seed(4, "method"))
    method.after_backward(out, batch)
    for m in data.modalities:
        for p in method.modulated[m]:
            assert torch.equal(p.grad, torch.randn(p.grad.shape, generator=gen) * torch.tensor(1e-8))


def test_conv_filter_leaves_other_encoder_weights_alone() -> None:
    data = TinyDataset()
    model = tiny_model(data)
    model.encoders["audio"].extra = torch.nn.Linear(2, 2)  # a matrix weight that is not a conv kernel
    extra = model.encoders["audio"].extra.weight
    conv = create_method("ogm_ge", model, params="conv")
    weights = create_method("ogm_ge", model, params="weights")
    assert all(p is not extra for p in conv.modulated["audio"])
    assert any(p is extra for p in weights.modulated["audio"])


def test_the_slice_guard_names_the_method_and_why() -> None:
    from balancemm.catalog.methods import OGMGEHParams
    from balancemm.errors import ConfigError
    from balancemm.methods import METHODS
    from tests.conftest import tiny_spec

    spec = tiny_spec(TinyDataset(), unimodal_heads="linear")
    with pytest.raises(ConfigError, match=r"^ogm_ge scores each modality by its slice of the fusion head"):
        METHODS.get("ogm_ge").model_spec(spec, OGMGEHParams())


def test_model_spec_asks_for_head_slices() -> None:
    from balancemm.catalog.methods import OGMGEHParams
    from balancemm.methods import METHODS
    from tests.conftest import tiny_spec

    assert tiny_spec(TinyDataset()).unimodal_heads == "auto"
    assert METHODS.get("ogm_ge").model_spec(tiny_spec(TinyDataset()), OGMGEHParams()).unimodal_heads == "slice"


def test_the_method_takes_its_arguments_by_keyword_too() -> None:
    from balancemm.catalog.methods import OGMGEHParams
    from balancemm.methods import METHODS

    data = TinyDataset()
    hp = OGMGEHParams(alpha=0.7)
    method = METHODS.get("ogm_ge")(model=tiny_model(data), ctx=RunContext(data.modalities), hp=hp)
    assert method.hp is hp and set(method.modulated) == set(data.modalities)


def test_a_kernel_without_gradient_does_not_stop_the_others() -> None:
    data = TinyDataset()
    model = tiny_model(data)
    method = create_method("ogm_ge", model, RunContext(data.modalities), ge=False, alpha=0.5)
    batch = first_batch(data)
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    kept = {}
    for m in data.modalities:  # in both modalities: one of them is shrunk (k < 1)
        first, *rest = method.modulated[m]
        assert rest, "the tiny encoder needs two conv kernels"
        first.grad = None  # e.g. a frozen stage
        kept[m] = (first, rest, [p.grad.clone() for p in rest])
    method.after_backward(out, batch)
    logs = method.ctx.pop_logs()
    assert min(logs.values()) < 1.0
    for m, (first, rest, before) in kept.items():
        for p, g in zip(rest, before, strict=True):
            torch.testing.assert_close(p.grad, g * logs[f"ogm/k_{m}"])
        assert first.grad is None
