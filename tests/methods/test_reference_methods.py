"""baseline and unimodal against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from balancemm.errors import ConfigError
from balancemm.methods import create_method
from balancemm.methods.unimodal import Unimodal
from balancemm.models import ModelOutput, build_model
from tests.conftest import TinyDataset, first_batch, tiny_model, tiny_spec


def test_baseline_loss_is_the_fused_cross_entropy() -> None:
    # logits [[2, 0], [0, 1]], labels [0, 1]: CE = mean(log(1 + e^-2), log(1 + e^-1)) = mean(0.126928, 0.313262)
    method = create_method("baseline", tiny_model(TinyDataset()))
    out = ModelOutput(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), {}, {})
    batch = first_batch(TinyDataset(), 2)
    batch = type(batch)(batch.inputs, torch.tensor([0, 1]), batch.index, batch.present, batch.modalities)
    losses = method.losses(out, batch)
    assert list(losses) == ["ce"]
    assert float(losses["ce"]) == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2)
    assert float(losses["ce"]) == pytest.approx(0.220095, abs=1e-6)


def test_unimodal_model_is_w_h_plus_b_on_one_modality() -> None:
    data = TinyDataset(3)
    spec = Unimodal.model_spec(tiny_spec(data), Unimodal.HParams(modality="text"))
    model = build_model(spec).eval()
    out = model(first_batch(data))
    fc = model.fusion.fc_out
    torch.testing.assert_close(out.logits, out.features["text"] @ fc.weight.t() + fc.bias)
    torch.testing.assert_close(out.unimodal_logits["text"], out.logits)  # b/M with M = 1
    with pytest.raises(ConfigError, match="one of audio, text, visual"):
        Unimodal.model_spec(tiny_spec(data), Unimodal.HParams(modality="depth"))
