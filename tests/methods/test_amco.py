"""AMCo (a reconstruction) against the spec's hand-computed numbers (specs/methods-optim-forward-data.md §9.4)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.amco  # noqa: F401  (registers "amco")
from balancemm.errors import ConfigError
from balancemm.methods.amco import AMCo, AMCoHParams, class_mask, dependence_mass, mask_ratio
from balancemm.models.classifier import ModelOutput
from balancemm.models.fusions.amco import AMCoFusion
from tests.conftest import TinyDataset, build_method, first_batch, tiny_spec


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


# -- the spec's numbers -------------------------------------------------------------------------


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
    a = class_mask(10, masked, torch.Generator().manual_seed(0))
    b = class_mask(10, masked, torch.Generator().manual_seed(0))
    c = class_mask(10, masked, torch.Generator().manual_seed(1))
    assert int((a == 0).sum()) == 8 and set(a.tolist()) == {0.0, 1.0}
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dependence_of_the_spec() -> None:
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


def test_without_a_flagged_modality_the_output_is_exactly_l_star_of_the_concat_head() -> None:
    data = TinyDataset()
    method = _method(data)
    fusion = _fusion(method)
    batch = first_batch(data)
    h = method.model.encode(batch)
    expected = fusion.linear_star(fusion.fc_out(torch.cat([h["audio"], h["visual"]], dim=1)))
    assert torch.equal(method.forward(batch).logits, expected)
    # a flagged modality at level 0 (p_t = 0, no class masked) changes nothing either
    method.dependent.fill_(True)
    assert torch.equal(method.forward(batch).logits, expected)
    method.eval()
    with torch.no_grad():  # no masking at inference, even with a flag set (eval mode: BN running statistics)
        h = method.model.encode(batch)
        expected = fusion.linear_star(fusion.fc_out(torch.cat([h["audio"], h["visual"]], dim=1)))
        method.level.fill_(0.3)
        assert torch.equal(method.predict(batch).logits, expected)


# -- behaviour ----------------------------------------------------------------------------------


def test_a_fully_masked_modality_gets_no_gradient_and_the_other_is_fused_alone() -> None:
    data = TinyDataset()
    method = _method(data)
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
    method = _method(data)
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
