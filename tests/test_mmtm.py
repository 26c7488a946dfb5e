"""MMTM blocks and the lockstep mid-fusion runner (balancemm/models/fusions/mmtm.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import pytest
import torch
from torch import nn

from balancemm.config import EncoderConfig
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.metrics.shapley import coalitions
from balancemm.models import ModelSpec, MultimodalClassifier, build_model
from balancemm.models.encoders.base import Encoder
from balancemm.models.encoders.cnn import CompactCNNOptions
from balancemm.models.encoders.resnet import ResNet18Options
from balancemm.models.fusions.mmtm import MMTM, MidFusion, MidFusionSpec
from tests.conftest import TinyDataset, first_batch, tiny_model, tiny_spec


def _blocks(model: MultimodalClassifier) -> list[MMTM]:
    assert model.mid_fusion is not None
    return cast(list[MMTM], list(model.mid_fusion.blocks))


def _excite(block: MMTM) -> list[nn.Linear]:
    return cast(list[nn.Linear], list(block.excite))


def _hand_block() -> MMTM:
    """dims (1, 1), ratio 2 → 2 joint units; W_sq = I, W_0 = [1, 0], W_1 = [0, 1], no biases."""
    block = MMTM([1, 1], ratio=2)
    w0, w1 = _excite(block)
    with torch.no_grad():
        block.squeeze.weight.copy_(torch.eye(2))
        w0.weight.copy_(torch.tensor([[1.0, 0.0]]))
        w1.weight.copy_(torch.tensor([[0.0, 1.0]]))
        for layer in (block.squeeze, w0, w1):
            layer.bias.zero_()
    return block


def test_block_equations_by_hand_for_a_1d_and_a_2d_map() -> None:
    # s_0 = mean(1, 3) = 2 (1-D map), s_1 = mean of a 2×2 map of −1 = −1; e = ReLU([2, −1]) = [2, 0]
    # g_0 = σ(2) = 0.880797, g_1 = σ(0) = 0.5 → outputs [0.880797, 2.642391] and a 2×2 map of −0.5
    block = _hand_block().eval()
    f0 = torch.tensor([[[1.0, 3.0]]])  # [B=1, d=1, L=2]
    f1 = -torch.ones(1, 1, 2, 2)  # [B=1, d=1, H=2, W=2]
    out0, out1 = block([f0, f1], batch_size=1)
    torch.testing.assert_close(out0, torch.tensor([[[0.880797, 2.642391]]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out1, torch.full((1, 1, 2, 2), -0.5))


def test_the_joint_layer_keeps_the_official_two_for_any_number_of_modalities() -> None:
    assert MMTM([64, 64], ratio=4).squeeze.out_features == 64  # official: int(2·128/4)
    assert MMTM([128, 128], ratio=4).squeeze.out_features == 128
    assert MMTM([16, 32, 64], ratio=4).squeeze.out_features == 56  # ⌊2·112/4⌋, not 3·112/4
    assert [layer.out_features for layer in MMTM([16, 32, 64]).excite] == [16, 32, 64]


def test_folded_frames_share_one_gate_per_clip() -> None:
    torch.manual_seed(0)
    block = MMTM([2, 3]).eval()
    f0, f1 = torch.randn(4, 2, 5), torch.randn(4 * 2, 3, 2, 2)  # visual: 2 distinct frames per clip, folded
    with torch.no_grad():
        out0, out1 = block([f0, f1], batch_size=4)
        s = torch.cat([f0.mean(2), f1.view(4, 2, 3, 2, 2).mean((1, 3, 4))], 1)  # time and space averaged
        g0, g1 = (torch.sigmoid(layer(torch.relu(block.squeeze(s)))) for layer in _excite(block))
    torch.testing.assert_close(out0, f0 * g0[:, :, None])
    torch.testing.assert_close(out1, (f1.view(4, 2, 3, 2, 2) * g1[:, None, :, None, None]).view(8, 3, 2, 2))


def test_running_average_is_each_modalitys_own_gate_over_training_calls() -> None:
    torch.manual_seed(0)
    block = MMTM([2, 3], ratio=1)
    calls = [[torch.randn(4, 2, 5), torch.randn(4, 3, 2, 2)] for _ in range(3)]

    def gates(maps: list[torch.Tensor]) -> list[torch.Tensor]:
        s = torch.cat([maps[0].mean(2), maps[1].mean((2, 3))], 1)
        e = torch.relu(block.squeeze(s))
        return [torch.sigmoid(layer(e)).mean(0) for layer in block.excite]

    with torch.no_grad():
        expected = [gates(maps) for maps in calls[:2]]
        for maps in calls[:2]:
            block(maps, batch_size=4)
        block.eval()(calls[2], batch_size=4)  # evaluation passes do not count
    avg0, avg1 = block.running_gates()
    assert avg0.shape == (2,) and avg1.shape == (3,) and int(block.calls) == 2
    torch.testing.assert_close(avg0, (expected[0][0] + expected[1][0]) / 2)
    torch.testing.assert_close(avg1, (expected[0][1] + expected[1][1]) / 2)


def test_curation_cuts_the_cared_modality_off_the_other() -> None:
    torch.manual_seed(0)
    block = MMTM([2, 3])
    f0, f1 = torch.randn(4, 2, 5), torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        block([f0, f1], batch_size=4)  # one training call so that ḡ is not zero
        block.eval()
        a0, a1 = block([f0, f1], batch_size=4, caring=0)
        b0, b1 = block([f0, f1 + torch.randn_like(f1)], batch_size=4, caring=0)
    torch.testing.assert_close(a0, b0)
    torch.testing.assert_close(a0, f0 * block.running_gates()[0].view(1, 2, 1))
    assert not torch.allclose(a1, b1)


def test_an_absent_modality_squeezes_to_zero() -> None:
    torch.manual_seed(0)
    block = MMTM([2, 3]).eval()
    f0, f1 = torch.randn(4, 2, 5), torch.randn(4, 3, 2, 2)
    keep = torch.tensor([[True, False], [True, True], [True, True], [True, True]])
    with torch.no_grad():
        masked0, _ = block([f0, f1], batch_size=4, keep=keep)
        zeroed0, _ = block([f0, f1 * keep[:, 1].view(4, 1, 1, 1)], batch_size=4)
    torch.testing.assert_close(masked0, zeroed0)  # row 0 sees visual as an all-zero map, others untouched


def test_frames_are_squeezed_over_time_and_gated_per_clip() -> None:
    enc = {
        "audio": EncoderConfig("cnn", CompactCNNOptions(channels=(4, 6, 8))),
        "visual": EncoderConfig("resnet18", ResNet18Options(width=4)),
    }
    spec = ModelSpec(
        ("audio", "visual"), {"audio": (4, 6), "visual": (3, 3, 16, 16)}, 3, enc, mid_fusion=MidFusionSpec(3)
    )
    torch.manual_seed(0)
    clips = build_model(spec).eval()
    single = build_model(replace(spec, input_shapes=dict(spec.input_shapes, visual=(1, 3, 16, 16)))).eval()
    single.load_state_dict(clips.state_dict())
    audio, frame = torch.randn(2, 4, 6), torch.randn(2, 1, 3, 16, 16)
    with torch.no_grad():
        three = clips(_batch({"audio": audio, "visual": frame.expand(2, 3, 3, 16, 16).contiguous()}))
        one = single(_batch({"audio": audio, "visual": frame}))
    # three copies of one frame squeeze, gate and pool exactly as that frame alone
    torch.testing.assert_close(three.logits, one.logits)
    torch.testing.assert_close(three.features["visual"], one.features["visual"])


def _batch(inputs: dict[str, torch.Tensor]) -> Batch:
    mods = tuple(sorted(inputs))
    n = next(iter(inputs.values())).shape[0]
    return Batch(
        inputs, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.ones(n, len(mods), dtype=torch.bool), mods
    )


@pytest.mark.parametrize(
    "stages, expected", [(3, [[4, 8], [6, 16], [8, 32]]), (1, [[8, 32]]), (9, [[4, 8], [6, 16], [8, 32]])]
)
def test_blocks_follow_the_last_k_stages_of_cnns_and_resnet18(stages: int, expected: list[list[int]]) -> None:
    # audio: 1-D cnn [C, L]; text: 2-D cnn [C, H, W]; visual: resnet18 on frames [T, C, H, W].
    # Stages align from the end (cnn 4, 6, 8; resnet18 width 4: 4, 8, 16, 32); k beyond the shallowest
    # encoder means after every one of its stages.
    enc = {
        "audio": EncoderConfig("cnn", CompactCNNOptions(channels=(4, 6, 8))),
        "text": EncoderConfig("cnn", CompactCNNOptions(channels=(4, 6, 8))),
        "visual": EncoderConfig("resnet18", ResNet18Options(width=4)),
    }
    shapes = {"audio": (4, 6), "text": (1, 6, 6), "visual": (2, 3, 16, 16)}
    model = build_model(ModelSpec(tuple(shapes), shapes, 5, enc, mid_fusion=MidFusionSpec(stages)))
    assert [[b.dims[0], b.dims[2]] for b in _blocks(model)] == expected
    assert all(b.dims[0] == b.dims[1] for b in _blocks(model))  # the two cnns match
    out = model(_batch({m: torch.randn(3, *s) for m, s in shapes.items()}))
    assert out.logits.shape == (3, 5)
    assert {m: tuple(h.shape) for m, h in out.features.items()} == {"audio": (3, 8), "text": (3, 8), "visual": (3, 32)}


def test_disabled_mid_fusion_is_the_plain_model(tiny: TinyDataset) -> None:
    plain = tiny_model(tiny).eval()
    torch.manual_seed(0)
    off = build_model(tiny_spec(tiny, mid_fusion=None)).eval()
    assert off.mid_fusion is None and off.state_dict().keys() == plain.state_dict().keys()
    batch = first_batch(tiny)
    with torch.no_grad():
        torch.testing.assert_close(off(batch).logits, plain(batch).logits, rtol=0, atol=0)
        # the lockstep runner itself, with no blocks, is each encoder's own forward
        encoders = {m: cast(Encoder, plain.encoders[m]) for m in tiny.modalities}
        runner = MidFusion(encoders, tiny.input_shapes, stages=0, ratio=4)
        assert len(runner.blocks) == 0
        features = runner(encoders, batch.inputs)
        for m in tiny.modalities:
            torch.testing.assert_close(features[m], plain.encoders[m](batch.inputs[m]), rtol=0, atol=0)


def test_mmtm_with_open_gates_reproduces_the_plain_model(tiny: TinyDataset) -> None:
    plain = tiny_model(tiny).eval()
    fused = build_model(tiny_spec(tiny, mid_fusion=MidFusionSpec(2))).eval()
    missing, unexpected = fused.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mid_fusion.") for k in missing)
    assert len(_blocks(fused)) == 2
    with torch.no_grad():
        for block in _blocks(fused):
            for layer in _excite(block):
                layer.bias.fill_(50.0)  # σ(50) rounds to 1 in float32: every gate is open
        batch = first_batch(tiny)
        torch.testing.assert_close(fused(batch).logits, plain(batch).logits, rtol=0, atol=0)


def test_feature_masking_keeps_absent_modalities_out_of_every_block(tiny: TinyDataset) -> None:
    model = build_model(tiny_spec(tiny, mid_fusion=MidFusionSpec(2))).eval()
    batch = first_batch(tiny)
    m0, m1 = tiny.modalities[0], tiny.modalities[-1]
    others = [m for m in tiny.modalities if m != m1]
    perturbed = Batch(
        dict(batch.inputs, **{m1: batch.inputs[m1] + 3.0}), batch.label, batch.index, batch.present, batch.modalities
    )
    with torch.no_grad():
        a = model(batch.with_only(others))
        b = model(perturbed.with_only(others))
        torch.testing.assert_close(a.features[m0], b.features[m0])
        torch.testing.assert_close(a.logits, b.logits)
        assert not torch.allclose(model(batch).features[m0], model(perturbed).features[m0])
        out, stacked = model.predict_coalitions(batch, coalitions(tiny.modalities))
        torch.testing.assert_close(out.logits, model(batch).logits)
        for k, s in enumerate(coalitions(tiny.modalities)):
            torch.testing.assert_close(stacked[k], model(batch.with_only(s)).logits)


def test_mid_fusion_parameters_are_shared_parameters(tiny: TinyDataset) -> None:
    model = build_model(tiny_spec(tiny, mid_fusion=MidFusionSpec(2)))
    groups = [set(map(id, model.modality_parameters(m))) for m in tiny.modalities]
    groups.append(set(map(id, model.head_parameters())))
    everything = set(map(id, model.parameters()))
    assert sum(len(g) for g in groups) == len(everything) == len(set().union(*groups))


def test_a_ratio_that_leaves_no_joint_unit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"mid-fusion: MMTM ratio 1000"):
        build_model(tiny_spec(TinyDataset(), mid_fusion=MidFusionSpec(1, 1000.0)))
