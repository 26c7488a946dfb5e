"""AMCo (a reconstruction of BalanceMM's reading) against hand-computed numbers."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.amco  # noqa: F401  (registers "amco")
from balancemm.context import derive_seed
from balancemm.errors import ConfigError
from balancemm.methods.amco import AMCo, AMCoHParams, dependence_mass, mask_ratio, random_mask
from balancemm.models.classifier import ModelOutput
from balancemm.models.fusions.amco import AMCoFusion
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec, train_epochs
from tests.methods.test_device_copies import _StepWatch


def _method(data: TinyDataset | None = None, **hp: Any) -> AMCo:
    method = build_method("amco", data or TinyDataset(), **hp)
    assert isinstance(method, AMCo)
    return method


def _fusion(method: AMCo) -> AMCoFusion:
    assert isinstance(method.model.fusion, AMCoFusion)
    return method.model.fusion


def _step(method: AMCo, batch: Any) -> ModelOutput:
    out = method.forward(batch)
    method.backward(method.losses(out, batch))
    method.after_backward(out, batch)
    method.ctx.optimizer_step()
    return out


# -- BalanceMM's numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, [0, 0, 0, 0, 0]), (1, [0, 0.5, 0.866025, 1, 1]), (2, [0, 0.866025, 1, 1, 1])],
)
def test_mask_schedule_over_the_first_five_batches(epoch: int, expected: list[float]) -> None:
    data = TinyDataset(n=40)
    method = _method(data)
    method.ctx.epoch = epoch
    method.level.fill_(7.0)  # whatever the previous epoch left, the epoch starts at level 0
    method.on_epoch_start(epoch)
    ratios = []
    for batch in method.ctx.batches("train", shuffle=True):  # 5 batches of 8
        ratios.append(mask_ratio(float(method.level), 0.3))
        _step(method, batch)
    assert ratios == pytest.approx(expected, abs=1e-6)


def test_number_of_masked_classes_and_the_shuffle() -> None:
    # N = ⌊p_t·C⌋: C = 10, p_t = 0.866025 → 8 zeros, at positions from the generator
    masked = int(mask_ratio(0.2, 0.3) * 10)
    assert masked == 8
    a = random_mask(10, masked, torch.Generator().manual_seed(0))
    b = random_mask(10, masked, torch.Generator().manual_seed(0))
    c = random_mask(10, masked, torch.Generator().manual_seed(1))
    assert int((a == 0).sum()) == 8 and set(a.tolist()) == {0.0, 1.0}
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dependence_of_one_confident_modality() -> None:
    # u_a = [10, 0], u_v = [0, 0]: a-block mass (e^10 + 1)/(e^10 + 3) = 0.999909
    u_a, u_v = torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert dependence_mass([u_a, u_v]).tolist() == pytest.approx([0.999909, 0.000091], abs=1e-6)
    method = _method()
    out = ModelOutput(torch.zeros(1, 2), {}, {"audio": u_a, "visual": u_v})
    method.after_backward(out, first_batch(TinyDataset(), n=1))
    assert method.dependent.tolist() == [True, False]
    method.after_backward(out._replace(unimodal_logits={"audio": u_v, "visual": u_a}), first_batch(TinyDataset(), n=1))
    assert method.dependent.tolist() == [False, True]


def test_dependence_with_three_modalities_flags_at_most_the_majority_holder() -> None:
    # u = ([10, 0], [0, 0], [0, 0]): first mass (e^10 + 1)/(e^10 + 5) = 0.999818; equal logits: 1/3 each
    big, zero = torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert dependence_mass([big, zero, zero])[0].item() == pytest.approx(0.999818, abs=1e-6)
    assert dependence_mass([zero, zero, zero]).tolist() == pytest.approx([1 / 3] * 3)
    method = _method(TinyDataset(3))
    out = ModelOutput(torch.zeros(1, 2), {}, {"audio": zero, "text": zero, "visual": zero})
    method.after_backward(out, first_batch(TinyDataset(3), n=1))
    assert method.dependent.tolist() == [False, False, False]


@pytest.mark.parametrize("unit", ["feature", "class"])
def test_without_a_flagged_modality_the_output_is_exactly_l_star_of_the_concat_head(unit: str) -> None:
    data = TinyDataset()
    method = _method(data, mask_unit=unit)
    fusion = _fusion(method)
    batch = first_batch(data)
    h = method.model.encode(batch)
    expected = fusion.linear_star(fusion.fc_out(torch.cat([h["audio"], h["visual"]], dim=1)))
    assert torch.equal(method.forward(batch).logits, expected)
    # a flagged modality at level 0 (p_t = 0: no unit or class masked, no rescaling) changes nothing either
    method.dependent.fill_(True)
    assert torch.equal(method.forward(batch).logits, expected)
    method.eval()
    with torch.no_grad():  # no masking at inference, even with a flag set (eval mode: BN running statistics)
        h = method.model.encode(batch)
        expected = fusion.linear_star(fusion.fc_out(torch.cat([h["audio"], h["visual"]], dim=1)))
        method.level.fill_(0.3)
        assert torch.equal(method.predict(batch).logits, expected)


# -- feature-unit mode (the default), by hand -----------------------------------------------------

# One sample, C = 3, d_a = d_v = 6, audio flagged; the head is set so that
#   u_a = [Σ_j h̃_a,j + 0.1, 0.2, 0.3],  u_v = [0.1, Σ_j h_v,j + 0.2, 0.3],  z = u_a + u_v (L* = identity),
# with h_a = [1, 2, 3, 4, 5, 6], h_v = 1 (Σ = 6) and b = [0.2, 0.4, 0.6] (b/2 in each slice).
# The device generator is seeded with 3; torch's CPU randperm(6) for seed 3 is [4, 0, 3, 2, 1, 5], so
# N masked units are {4, 0, 3, 2}[:N] and the rest are kept.
S = 2 + math.sqrt(2)  # ℓ = 0.15, ε = 0.3: p_t = sin(π/4) = 1/√2, N = ⌊6/√2⌋ = ⌊4.24⌋ = 4, 1/(1 − 1/√2) = 2 + √2
Q = 1 / (1 - math.sin(math.pi / 60))  # ℓ = 0.01: p_t = sin(3°) = 0.0523360, N = ⌊0.314⌋ = 0, scale 1.0552263
FEATURE_CASES = {  # (level, rescale): h̃_a
    "p_t 1/√2, rescaled": (0.15, True, [0, 2 * S, 0, 0, 0, 6 * S]),  # kept 1 and 5: Σ = 8(2 + √2) = 27.3137085
    "p_t 1/√2, plain": (0.15, False, [0, 2, 0, 0, 0, 6]),  # Σ = 8
    "p_t sin 3°, nothing dropped": (0.01, True, [Q, 2 * Q, 3 * Q, 4 * Q, 5 * Q, 6 * Q]),  # Σ = 21Q = 22.1597518
    # ℓ = 0.25: p_t = sin(75°) = 0.9659258, N = ⌊5.80⌋ = 5, only unit 5 kept; 1/(1 − p_t) = 29.3 is capped at 10
    "p_t sin 75°, capped": (0.25, True, [0, 0, 0, 0, 0, 60]),
    "p_t 1": (0.3, True, [0, 0, 0, 0, 0, 0]),  # every unit dropped: u_a = b/2, z = the visual-only output
}


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_feature_mask_on_one_sample_by_hand(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    level, rescale, masked_audio = FEATURE_CASES[case]
    assert torch.randperm(6, generator=torch.Generator().manual_seed(3)).tolist() == [4, 0, 3, 2, 1, 5]
    data = TinyDataset()
    method = _method(data, rescale=rescale)
    fusion = _fusion(method)
    with torch.no_grad():
        fusion.fc_out.weight.zero_()
        fusion.fc_out.weight[0, :6] = 1  # class 0 reads audio
        fusion.fc_out.weight[1, 6:] = 1  # class 1 reads visual
        fusion.fc_out.bias.copy_(torch.tensor([0.2, 0.4, 0.6]))
        fusion.linear_star.weight.copy_(torch.eye(3))
        fusion.linear_star.bias.zero_()
    h = {"audio": torch.tensor([[1.0, 2, 3, 4, 5, 6]]), "visual": torch.ones(1, 6)}
    monkeypatch.setattr(method.model, "encode", lambda batch: dict(h))
    method.ctx.epoch = 1
    method.level.fill_(level)
    method.dependent.copy_(torch.tensor([True, False]))
    method.ctx.device_generator.manual_seed(3)
    out = method.forward(first_batch(data, n=1))
    audio = torch.tensor([masked_audio], dtype=torch.float32)
    torch.testing.assert_close(out.features["audio"], audio)
    torch.testing.assert_close(out.features["visual"], h["visual"])
    u_a = torch.tensor([[float(audio.sum()) + 0.1, 0.2, 0.3]])
    torch.testing.assert_close(out.unimodal_logits["audio"], u_a)
    torch.testing.assert_close(out.unimodal_logits["visual"], torch.tensor([[0.1, 6.2, 0.3]]))
    torch.testing.assert_close(out.logits, torch.tensor([[float(audio.sum()) + 0.2, 6.4, 0.6]]))


def test_feature_mask_drops_the_same_units_for_every_sample() -> None:
    data = TinyDataset()
    method = _method(data)
    batch = first_batch(data)
    method.ctx.epoch = 1
    method.level.fill_(0.15)  # p_t = 1/√2: 4 of the 6 units, kept ones × (2 + √2)
    method.dependent.copy_(torch.tensor([False, True]))
    method.ctx.device_generator.manual_seed(3)  # permutation [4, 0, 3, 2, 1, 5]: units 1 and 5 kept
    out = method.forward(batch)
    plain = method.model.encode(batch)
    expected = torch.zeros_like(plain["visual"])
    expected[:, [1, 5]] = plain["visual"][:, [1, 5]] * (2 + math.sqrt(2))
    torch.testing.assert_close(out.features["visual"], expected)
    torch.testing.assert_close(out.features["audio"], plain["audio"])
    seen = {"audio": plain["audio"], "visual": expected}
    torch.testing.assert_close(out.logits, _fusion(method)(seen))
    torch.testing.assert_close(out.unimodal_logits["visual"], _fusion(method).slice(seen)["visual"])


def test_a_fully_feature_masked_modality_gets_no_gradient_and_z_is_the_model_without_it() -> None:
    data = TinyDataset()
    method = _method(data)
    fusion = _fusion(method)
    batch = first_batch(data)
    method.ctx.epoch = 1
    method.level.fill_(0.3)  # p_t = 1: every unit dropped
    method.dependent.copy_(torch.tensor([True, False]))
    out = method.forward(batch)
    # unlike the class mask, the slice keeps its bias share b/M, so z is the model's own visual-only output
    torch.testing.assert_close(out.unimodal_logits["audio"], (fusion.fc_out.bias / 2).expand(8, 3))
    torch.testing.assert_close(out.logits, method.model(batch.with_only({"visual"})).logits)
    method.backward(method.losses(out, batch))
    audio = [p.grad for p in method.model.encoders["audio"].parameters()]
    assert all(g is None or not bool(g.any()) for g in audio)
    assert fusion.fc_out.bias.grad is not None and bool(fusion.fc_out.bias.grad.any())


# -- behaviour ----------------------------------------------------------------------------------


def test_a_fully_masked_modality_gets_no_gradient_and_the_other_is_fused_alone() -> None:
    data = TinyDataset()
    method = _method(data, mask_unit="class")
    fusion = _fusion(method)
    batch = first_batch(data)
    method.ctx.epoch = 1
    method.level.fill_(0.3)  # p_t = 1: every class masked
    method.dependent.copy_(torch.tensor([True, False]))
    out = method.forward(batch)
    assert not bool(out.unimodal_logits["audio"].any())
    h = method.model.encode(batch)
    torch.testing.assert_close(out.logits, fusion.linear_star(fusion.slice(h)["visual"]))
    losses = method.losses(out, batch)
    assert set(losses) == {"ce", "uni_audio", "uni_visual"}
    assert losses["uni_audio"].item() == pytest.approx(torch.log(torch.tensor(3.0)).item())  # CE of zeros, C = 3
    method.backward(losses)
    audio = [p.grad for p in method.model.encoders["audio"].parameters()]
    assert all(g is None or not bool(g.any()) for g in audio)
    assert any(g is not None and bool(g.any()) for g in (p.grad for p in method.model.encoders["visual"].parameters()))


def test_a_partial_mask_zeroes_the_same_classes_for_every_sample() -> None:
    data = TinyDataset()
    method = _method(data, mask_unit="class")
    batch = first_batch(data)
    method.ctx.epoch = 1
    method.level.fill_(0.1)  # p_t = 0.5 → N = ⌊1.5⌋ = 1 of C = 3
    method.dependent.copy_(torch.tensor([False, True]))
    out = method.forward(batch)
    plain = _fusion(method).slice(method.model.encode(batch))
    zero_columns = (out.unimodal_logits["visual"] == 0).all(0)
    assert int(zero_columns.sum()) == 1
    torch.testing.assert_close(out.unimodal_logits["visual"][:, ~zero_columns], plain["visual"][:, ~zero_columns])
    torch.testing.assert_close(out.unimodal_logits["audio"], plain["audio"])
    torch.testing.assert_close(out.logits, _fusion(method).combine(out.unimodal_logits))


def test_outside_the_window_plain_ce_no_mask_and_frozen_flags() -> None:
    data = TinyDataset()
    method = _method(data, modulation_starts=0, modulation_ends=1)
    batch = first_batch(data)
    method.ctx.epoch = 2
    method.level.fill_(0.3)
    method.dependent.copy_(torch.tensor([True, False]))
    out = method.forward(batch)
    assert torch.equal(out.logits, method.model(batch).logits)
    losses = method.losses(out, batch)
    assert set(losses) == {"ce"} and torch.equal(losses["ce"], F.cross_entropy(out.logits, batch.label))
    method.after_backward(out, batch)
    assert method.dependent.tolist() == [True, False]  # dependence is only measured inside the window
    assert float(method.level) == pytest.approx(0.5)  # the level grows by epoch/10 anyway


def test_co_optimisation_losses_inside_the_window() -> None:
    data = TinyDataset()
    method = _method(data)
    batch = first_batch(data)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    assert torch.equal(losses["ce"], F.cross_entropy(out.logits, batch.label))
    for m in data.modalities:
        assert torch.equal(losses[f"uni_{m}"], F.cross_entropy(out.unimodal_logits[m], batch.label))


def test_flags_and_level_are_checkpointed_state() -> None:
    data = TinyDataset()
    method = _method(data)
    method.level.fill_(0.2)
    method.dependent.copy_(torch.tensor([False, True]))
    clone = _method(data)
    clone.load_state_dict(method.state_dict())
    assert clone.dependent.tolist() == [False, True] and float(clone.level) == 0.2


def test_the_model_gets_the_l_star_fusion_and_other_fusions_are_refused() -> None:
    spec = AMCo.model_spec(tiny_spec(TinyDataset()), AMCoHParams())
    assert spec.fusion == "amco" and spec.unimodal_heads == "slice"
    for kw in ({"fusion": "sum"}, {"fusion": "film"}, {"unimodal_heads": "linear"}):
        with pytest.raises(ConfigError, match=r"model\.fusion=concat"):
            AMCo.model_spec(tiny_spec(TinyDataset(), **kw), AMCoHParams())
    with pytest.raises(ConfigError, match="modulation_ends"):
        build_method("amco", TinyDataset(), modulation_starts=3, modulation_ends=2)
    with pytest.raises(ConfigError, match="mask_unit"):
        build_method("amco", TinyDataset(), mask_unit="logit")


def test_class_mode_steps_make_no_host_data() -> None:
    # test_device_copies runs the default (feature) mode; the class mask draws on the device too.
    method = _method(mask_unit="class")
    ctx = method.ctx
    ctx._device_generator = torch.Generator().manual_seed(derive_seed(ctx.seed, "device copies"))
    watch = ctx.meter = _StepWatch(ctx)
    train_epochs(method, 2)  # epoch 1 masks from its second batch on
    assert not watch.found, sorted(watch.found)


# -- data-parallel runs -------------------------------------------------------------------------


def test_dependence_of_shards_with_a_global_mean_is_the_whole_batchs() -> None:
    g = torch.Generator().manual_seed(0)
    u_a, u_v = torch.randn(5, 3, generator=g) * 3, torch.randn(5, 3, generator=g)
    ranks = [([u_a[:3], u_v[:3]], u_a[3:], u_v[3:]), ([u_a[3:], u_v[3:]], u_a[:3], u_v[:3])]
    for shard, other_a, other_v in ranks:
        # The other rank's per-row masses joined to this rank's: what ctx.global_mean averages.
        others = dependence_mass([other_a, other_v], batch_mean=lambda t: t)

        def global_mean(t: torch.Tensor, others: torch.Tensor = others) -> torch.Tensor:
            return torch.cat([t, others]).mean(0)

        together = dependence_mass(shard, global_mean)
        torch.testing.assert_close(together, dependence_mass([u_a, u_v]), rtol=0, atol=1e-6)


def test_the_flags_come_from_the_mean_over_every_ranks_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    data = TinyDataset()
    method = _method(data)
    batch = first_batch(data)
    seen: list[torch.Tensor] = []

    def global_mean(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.tensor([0.3, 0.7])  # the global batch's masses, whatever this shard holds

    monkeypatch.setattr(method.ctx, "global_mean", global_mean)
    out = method.forward(batch)
    method.after_backward(out, batch)
    assert [tuple(t.shape) for t in seen] == [(len(batch), 2)]  # per-row masses, one row per sample
    assert method.dependent.tolist() == [False, True]
