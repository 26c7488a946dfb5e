"""MMCosine and the cosine fusion against numbers computed by hand (equations in docs/methods/mmcosine.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import balancemm.methods.mmcosine  # noqa: F401  (registers the method)
from balancemm.errors import ConfigError
from balancemm.methods import create_method
from balancemm.methods.mmcosine import MMCosine
from balancemm.metrics.shapley import coalitions
from balancemm.models import build_model
from balancemm.models.fusions.cosine import CosineFusion
from tests.conftest import TinyDataset, first_batch, tiny_spec


def _hand_fusion() -> CosineFusion:
    fusion = CosineFusion({"audio": 2, "visual": 2}, num_classes=2, scale=10.0)
    with torch.no_grad():
        # columns 0-1 belong to audio, 2-3 to visual (sorted modality order)
        fusion.fc_out.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 2.0, -1.0, 0.0]]))
    return fusion


def test_hand_computed_logits_normalise_each_modality_block_separately() -> None:
    fusion = _hand_fusion()
    features = {"audio": torch.tensor([[1.0, 0.0]]), "visual": torch.tensor([[3.0, 4.0]])}
    parts = fusion.slice(features)
    # audio: cos((1,0),(1,1)) = 1/√2 → 10·0.707107 = 7.071068; cos((1,0),(0,2)) = 0
    torch.testing.assert_close(parts["audio"], torch.tensor([[10 / math.sqrt(2), 0.0]]))
    # visual: ‖(3,4)‖ = 5; cos((3,4),(0,1)) = 4/5 → 8; cos((3,4),(−1,0)) = −3/5 → −6
    torch.testing.assert_close(parts["visual"], torch.tensor([[8.0, -6.0]]))
    # fused: (15.071068, −6); a whole-row normalisation would give (10·(1 + 4/5)/√3, …) = (10.392, …)
    torch.testing.assert_close(fusion(features), torch.tensor([[15.071068, -6.0]]))


def test_scale_invariance_in_features_and_class_row_blocks() -> None:
    gen = torch.Generator().manual_seed(0)
    fusion = CosineFusion({"audio": 4, "text": 3, "visual": 5}, num_classes=3, scale=15.0)
    features = {m: torch.randn(6, d, generator=gen) for m, d in fusion.dims.items()}
    before = fusion(features)
    scaled = {m: h * torch.rand(6, 1, generator=gen).add(0.1) * 7 for m, h in features.items()}
    with torch.no_grad():
        fusion.fc_out.weight[1, 4:7] *= 3.5  # one class row of the text block only
        fusion.fc_out.weight[:, :4] *= 0.01  # the whole audio block
    torch.testing.assert_close(fusion(scaled), before)


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_logits_are_bounded_by_s_per_modality_and_m_times_s_fused(num_modalities: int) -> None:
    gen = torch.Generator().manual_seed(1)
    dims = dict(list({"audio": 4, "text": 3, "visual": 5}.items())[:num_modalities])
    fusion = CosineFusion(dims, num_classes=4, scale=15.0)
    with torch.no_grad():
        fusion.fc_out.weight.mul_(1e3)
    features = {m: 1e3 * torch.randn(64, d, generator=gen) for m, d in dims.items()}
    with torch.no_grad():
        for z in fusion.slice(features).values():
            assert float(z.abs().max()) <= 15.0 + 1e-4
        assert float(fusion(features).abs().max()) <= num_modalities * 15.0 + 1e-4
        # aligned feature and class row reach the bound exactly: cos = 1 in every modality
        fusion.fc_out.weight.copy_(torch.cat([torch.ones(4, d) for d in dims.values()], dim=1))
        aligned = fusion({m: torch.ones(1, d) for m, d in dims.items()})
    torch.testing.assert_close(aligned, torch.full((1, 4), num_modalities * 15.0))


def test_identical_modalities_contribute_half_each() -> None:
    gen = torch.Generator().manual_seed(2)
    fusion = CosineFusion({"audio": 3, "visual": 3}, num_classes=3)
    with torch.no_grad():
        fusion.fc_out.weight[:, 3:] = fusion.fc_out.weight[:, :3]
    h = torch.randn(5, 3, generator=gen)
    parts = fusion.slice({"audio": h, "visual": h})
    torch.testing.assert_close(parts["audio"], parts["visual"])
    torch.testing.assert_close(parts["audio"], fusion({"audio": h, "visual": h}) / 2)


def test_model_spec_installs_the_cosine_head_with_the_original_scale() -> None:
    data = TinyDataset()
    spec = MMCosine.model_spec(tiny_spec(data), MMCosine.HParams())
    assert (spec.fusion, spec.unimodal_heads, spec.fusion_options) == ("cosine", "slice", {"scale": 10.0})
    model = build_model(MMCosine.model_spec(tiny_spec(data), MMCosine.HParams(scale=15.0)))
    assert isinstance(model.fusion, CosineFusion) and model.fusion.scale == 15.0
    assert model.unimodal_heads is None and model.fusion.fc_out.bias is None  # no bias to train


def test_training_step_loss_is_ce_of_the_cosine_sum_and_no_bias_gradient(tiny: TinyDataset) -> None:
    torch.manual_seed(0)
    model = build_model(MMCosine.model_spec(tiny_spec(tiny), MMCosine.HParams()))
    method = create_method("mmcosine", model)
    batch = first_batch(tiny)
    out = method.forward(batch)
    losses = method.losses(out, batch)
    method.backward(losses)
    expected = sum(model.fusion.slice(out.features).values())
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(losses["ce"], F.cross_entropy(expected, batch.label))
    assert float(out.logits.detach().abs().max()) <= len(tiny.modalities) * 10.0
    fusion_params = dict(model.fusion.named_parameters())
    assert list(fusion_params) == ["fc_out.weight"] and fusion_params["fc_out.weight"].grad is not None


def test_masked_modality_gives_zero_cosine_without_nan(tiny: TinyDataset) -> None:
    torch.manual_seed(0)
    model = build_model(MMCosine.model_spec(tiny_spec(tiny), MMCosine.HParams()))
    batch = first_batch(tiny)
    m0 = tiny.modalities[0]
    out = model(batch.with_only(tiny.modalities[1:]))
    assert torch.count_nonzero(out.unimodal_logits[m0]) == 0
    torch.testing.assert_close(out.logits, sum(out.unimodal_logits[m] for m in tiny.modalities[1:]))
    F.cross_entropy(out.logits, batch.label).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # every modality absent: logits are exactly 0 (a uniform prediction), still finite
    _, coal = model.predict_coalitions(batch, coalitions(model.modalities))
    assert torch.isfinite(coal).all() and torch.count_nonzero(coal[0]) == 0


REFUSED = [("gated", "auto"), ("film", "auto"), ("amco", "auto"), ("concat", "linear")]


@pytest.mark.parametrize(("fusion", "heads"), REFUSED)
def test_fusions_without_per_modality_linear_terms_are_refused(fusion: str, heads: str) -> None:
    # AMCo's masked head is sliceable too, but its slices are not the late linear terms the cosine replaces.
    with pytest.raises(ConfigError) as err:
        MMCosine.model_spec(tiny_spec(TinyDataset(), fusion=fusion, unimodal_heads=heads), MMCosine.HParams())
    assert str(err.value) == (
        "mmcosine replaces a late linear fusion head by per-modality cosines, which are also its per-modality "
        f"logits (got model.fusion={fusion}, model.unimodal_heads={heads}): use model.fusion=concat or sum with "
        "model.unimodal_heads=auto or slice"
    )


@pytest.mark.parametrize("fusion", ["concat", "sum", "cosine"])
def test_late_linear_fusions_and_its_own_cosine_head_are_taken(fusion: str) -> None:
    # "cosine" is what model_spec itself installs: a spec that went through it once passes again.
    spec = MMCosine.model_spec(tiny_spec(TinyDataset(), fusion=fusion), MMCosine.HParams(scale=7.0))
    assert (spec.fusion, spec.unimodal_heads, spec.fusion_options) == ("cosine", "slice", {"scale": 7.0})
