"""Models: fusion conventions, masking, coalitions, parameter ownership, encoders."""

from __future__ import annotations

import pytest
import torch

from balancemm.config import EncoderConfig
from balancemm.errors import ConfigError
from balancemm.metrics.shapley import coalitions
from balancemm.models import ENCODERS, ModelSpec, build_model
from balancemm.models.encoders.cnn import CompactCNNOptions
from balancemm.models.encoders.resnet import ResNet18, ResNet18Options
from tests.conftest import TinyDataset, first_batch, tiny_model, tiny_spec


def test_concat_slices_sum_to_fused_logits(tiny: TinyDataset) -> None:
    model = tiny_model(tiny)
    out = model(first_batch(tiny))
    assert out.logits.shape == (8, 3)
    total = sum(out.unimodal_logits.values())
    torch.testing.assert_close(total, out.logits)
    # z_m = W_m h_m + b/M by hand for the first modality
    m0 = tiny.modalities[0]
    d0 = model.encoders[m0].num_features
    w, b = model.fusion.fc_out.weight, model.fusion.fc_out.bias
    torch.testing.assert_close(out.unimodal_logits[m0], out.features[m0] @ w[:, :d0].t() + b / len(tiny.modalities))


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated", "shared"])
def test_every_fusion_runs_with_two_and_three_modalities(tiny: TinyDataset, fusion: str) -> None:
    model = tiny_model(tiny, fusion=fusion)
    out = model(first_batch(tiny))
    assert out.logits.shape == (8, 3)
    assert set(out.unimodal_logits) == set(tiny.modalities)
    assert (model.unimodal_heads is None) == (fusion in ("concat", "sum", "shared"))  # auto: slice where possible


@pytest.mark.parametrize("hidden", [0, 5])
def test_shared_head_applies_one_head_to_every_modality(tiny: TinyDataset, hidden: int) -> None:
    model = tiny_model(tiny, fusion="shared", fusion_options={"hidden": hidden})
    out = model(first_batch(tiny))
    for m in tiny.modalities:
        torch.testing.assert_close(out.unimodal_logits[m], model.fusion.head(out.features[m]))
    torch.testing.assert_close(out.logits, sum(out.unimodal_logits.values()))


def test_shared_head_refuses_unequal_feature_sizes() -> None:
    data = TinyDataset()
    spec = tiny_spec(data, fusion="shared")
    encoders = dict(spec.encoders, visual=EncoderConfig("cnn", CompactCNNOptions(channels=(4, 7))))
    with pytest.raises(ConfigError, match=r"same feature size \(got audio=6, visual=7\)"):
        build_model(ModelSpec(spec.modalities, spec.input_shapes, spec.num_classes, encoders, fusion="shared"))


def test_slice_heads_refused_for_unsliceable_fusion() -> None:
    with pytest.raises(ConfigError, match=r"use model\.unimodal_heads=linear"):
        build_model(tiny_spec(TinyDataset(), fusion="film", unimodal_heads="slice"))


def test_feature_masking_equals_removing_the_modality(tiny: TinyDataset) -> None:
    model = tiny_model(tiny).eval()
    batch = first_batch(tiny)
    m0 = tiny.modalities[0]
    masked = model(batch.with_only([m for m in tiny.modalities if m != m0]))
    assert torch.count_nonzero(masked.features[m0]) == 0
    full = model(batch)
    # concat: dropping h_m removes exactly its slice W_m h_m from the fused logits
    w, d0 = model.fusion.fc_out.weight, model.encoders[m0].num_features
    torch.testing.assert_close(masked.logits, full.logits - full.features[m0] @ w[:, :d0].t())


def test_input_masking_zeroes_inputs_before_the_encoder() -> None:
    data = TinyDataset()
    model = tiny_model(data, mask="input").eval()
    batch = first_batch(data)
    out = model(batch.with_only(["visual"]))
    zero_input = dict(batch.inputs, audio=torch.zeros_like(batch.inputs["audio"]))
    expected = model.encoders["audio"](zero_input["audio"])
    torch.testing.assert_close(out.features["audio"], expected)


@pytest.mark.parametrize("mask", ["feature", "input"])
def test_coalition_logits_equal_one_forward_per_coalition(tiny: TinyDataset, mask: str) -> None:
    model = tiny_model(tiny, mask=mask).eval()
    batch = first_batch(tiny)
    coals = coalitions(tiny.modalities)
    with torch.no_grad():
        out, stacked = model.predict_coalitions(batch, coals)
        torch.testing.assert_close(out.logits, model(batch).logits)
        for k, s in enumerate(coals):
            torch.testing.assert_close(stacked[k], model(batch.with_only(s)).logits)


def test_parameters_are_owned_by_structure(tiny: TinyDataset) -> None:
    model = tiny_model(tiny, unimodal_heads="linear")
    groups = [set(map(id, model.modality_parameters(m))) for m in tiny.modalities]
    groups.append(set(map(id, model.head_parameters())))
    everything = set(map(id, model.parameters()))
    assert sum(len(g) for g in groups) == len(everything) == len(set().union(*groups))


def test_unimodal_spec_keeps_one_modality() -> None:
    data = TinyDataset(3)
    model = build_model(tiny_spec(data).only(["text"]))
    assert model.modalities == ("text",)
    assert model(first_batch(data)).logits.shape == (8, 3)  # batch still carries all three


def test_resnet18_audio_and_frames_conventions() -> None:
    torch.manual_seed(0)
    audio = ResNet18((1, 64, 48), ResNet18Options(width=8))
    assert audio(torch.randn(2, 1, 64, 48)).shape == (2, 64)
    frames = ResNet18((3, 3, 32, 32), ResNet18Options(width=8)).eval()
    clip = torch.randn(2, 1, 3, 32, 32)
    # frames are mean-pooled: three copies of one frame give that frame's feature
    one = frames(clip.expand(2, 3, 3, 32, 32).contiguous())
    single = ResNet18((1, 3, 32, 32), ResNet18Options(width=8)).eval()
    single.load_state_dict(frames.state_dict())
    torch.testing.assert_close(one, single(clip))
    full = ResNet18((3, 224, 224))
    assert sum(p.numel() for p in full.parameters()) == 11_176_512  # torchvision's resnet18 minus fc
    assert {"conv1.weight", "layer4.1.bn2.running_var"} <= set(full.state_dict())


def test_stages_compose_to_forward() -> None:
    for name, shape in [("cnn", (4, 6)), ("cnn", (1, 6, 6)), ("resnet18", (1, 32, 32))]:
        cls = ENCODERS.get(name)
        enc = cls(shape, cls.Options(**({"width": 4} if name == "resnet18" else {}))).eval()
        x = torch.randn(3, *shape)
        h = enc.enter(x)
        for stage in enc.stages():
            h = stage(h)
        torch.testing.assert_close(enc.exit(h, 3), enc(x))


def test_bad_encoder_input_is_a_config_error() -> None:
    spec = ModelSpec(("audio",), {"audio": (5,)}, 3, {"audio": EncoderConfig("cnn", ENCODERS.get("cnn").Options())})
    with pytest.raises(ConfigError, match=r"model\.encoders\.audio: cnn encoder takes"):
        build_model(spec)
