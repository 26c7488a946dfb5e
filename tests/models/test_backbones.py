"""The paper's backbones: sequence Transformer, BERT, ViT, and ResNet-18 from a local checkpoint."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import Tensor

from balancemm.config import EncoderConfig, ModelConfig
from balancemm.data.batch import Batch
from balancemm.errors import ConfigError
from balancemm.models import ModelSpec, build_model
from balancemm.models.encoders.cnn import CompactCNNOptions
from balancemm.models.encoders.resnet import ResNet18, ResNet18Options
from balancemm.models.encoders.text import BertEncoder, BertOptions
from balancemm.models.encoders.transformer import ChannelFirstLayer, SequenceTransformer, SequenceTransformerOptions
from balancemm.models.encoders.vit import ViTEncoder, ViTOptions
from balancemm.models.fusions.mmtm import MMTM, MidFusionSpec
from balancemm.schema import parse

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the text extra (transformers) is not installed"
)

TINY_SEQ = SequenceTransformerOptions(d_model=8, layers=2, heads=2, feedforward=16)
TINY_BERT = BertOptions(hidden=16, layers=2, heads=2, intermediate=32, vocab_size=40, max_positions=16)
TINY_VIT = ViTOptions(image_size=32, patch_size=8, hidden=16, layers=2, heads=2, intermediate=32)


def _batch(inputs: dict[str, Tensor]) -> Batch:
    mods = tuple(sorted(inputs))
    n = next(iter(inputs.values())).shape[0]
    return Batch(
        inputs, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.ones(n, len(mods), dtype=torch.bool), mods
    )


# -- transformer -------------------------------------------------------------------------------


def _by_hand(enc: SequenceTransformer, x: Tensor) -> Tensor:
    """Projection then each nn.TransformerEncoderLayer on batch-first [B, T, d]."""
    h = enc.proj(x.transpose(1, 2)).transpose(1, 2)
    for stage in enc.layers:
        assert isinstance(stage, ChannelFirstLayer)
        h = stage.layer(h)
    return h


def test_transformer_last_step_and_mean_pooling_by_hand() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7)  # [B, T, D]
    last = SequenceTransformer((5, 7), TINY_SEQ).eval()
    mean = SequenceTransformer((5, 7), replace(TINY_SEQ, pooling="mean")).eval()
    mean.load_state_dict(last.state_dict())
    with torch.no_grad():
        h = _by_hand(last, x)
        assert last(x).shape == (3, 8) and last.num_features == 8
        torch.testing.assert_close(last(x), h[:, -1])
        torch.testing.assert_close(mean(x), h.mean(dim=1))


def test_transformer_stages_are_channel_first_and_compose_to_forward() -> None:
    torch.manual_seed(0)
    enc = SequenceTransformer((5, 7), TINY_SEQ).eval()
    x = torch.randn(3, 5, 7)
    with torch.no_grad():
        h = enc.enter(x)
        assert h.shape == (3, 8, 5)  # [B, d_model, T]
        for stage in enc.stages():
            h = stage(h)
            assert h.shape == (3, 8, 5)
        torch.testing.assert_close(enc.exit(h, 3), enc(x))
    assert len(enc.stages()) == TINY_SEQ.layers


def test_transformer_sinusoidal_positions_are_added_after_the_projection() -> None:
    torch.manual_seed(0)
    enc = SequenceTransformer((5, 7), replace(TINY_SEQ, positional="sinusoidal"))
    x = torch.randn(2, 5, 7)
    delta = enc.enter(x) - enc.proj(x.transpose(1, 2))  # [B, d, T]: the table, the same for every sample
    torch.testing.assert_close(delta[:, 0::2, 0], torch.zeros(2, 4))  # sin(0) on even channels
    torch.testing.assert_close(delta[:, 1::2, 0], torch.ones(2, 4))  # cos(0) on odd channels
    torch.testing.assert_close(delta[0, 0], torch.sin(torch.arange(5.0)))  # channel 0: sin(t)
    assert "positions" not in enc.state_dict()  # fixed, not saved


def test_mmtm_runs_over_three_transformer_encoders() -> None:
    shapes: dict[str, tuple[int, ...]] = {"audio": (6, 5), "text": (4, 7), "visual": (5, 3)}
    encoders = {m: EncoderConfig("transformer", TINY_SEQ) for m in shapes}
    torch.manual_seed(0)
    model = build_model(ModelSpec(tuple(sorted(shapes)), shapes, 2, encoders, mid_fusion=MidFusionSpec(2)))
    assert model.mid_fusion is not None
    assert [block.dims for block in cast(list[MMTM], list(model.mid_fusion.blocks))] == [(8, 8, 8), (8, 8, 8)]
    out = model(_batch({m: torch.randn(3, *s) for m, s in shapes.items()}))
    assert out.logits.shape == (3, 2) and set(out.features) == set(shapes)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.mid_fusion.parameters())


# -- bert --------------------------------------------------------------------------------------


def _saved_bert(directory: Path) -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = BertModel(config).eval()
    model.save_pretrained(directory)
    return model


@needs_transformers
def test_bert_loads_a_local_directory_and_matches_the_hf_pooler_with_the_mask(tmp_path: Path) -> None:
    hf = _saved_bert(tmp_path)
    enc = BertEncoder((8,), BertOptions(pretrained=str(tmp_path))).eval()
    key = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(enc.model.state_dict()[key], hf.state_dict()[key], atol=0, rtol=0)
    ids = torch.tensor([[2, 5, 7, 9, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
        torch.testing.assert_close(enc(ids), expected)
    assert enc.num_features == 16 and enc.pad_id == 0


@needs_transformers
def test_bert_mean_pooling_ignores_padding(tmp_path: Path) -> None:
    _saved_bert(tmp_path)
    enc = BertEncoder((8,), BertOptions(pretrained=str(tmp_path), pooling="mean")).eval()
    assert getattr(enc.model, "pooler", None) is None  # not used, so not kept
    short = torch.tensor([[2, 5, 7, 9], [3, 4, 6, 8]])
    padded = torch.cat([short, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(enc(padded), enc(short), atol=1e-5, rtol=1e-5)
        assert torch.equal(enc(torch.zeros(1, 8, dtype=torch.long)), torch.zeros(1, 16))  # all pad: 0, not NaN


@needs_transformers
def test_half_precision_checkpoints_load_as_float32(tmp_path: Path) -> None:
    _saved_bert(tmp_path).half().save_pretrained(tmp_path / "half")
    enc = BertEncoder((8,), BertOptions(pretrained=str(tmp_path / "half")))
    assert {p.dtype for p in enc.parameters()} == {torch.float32}


@needs_transformers
def test_bert_from_scratch_with_projection_trains_every_parameter() -> None:
    torch.manual_seed(0)
    enc = BertEncoder((6,), replace(TINY_BERT, pooling="cls", proj=12))
    assert enc.num_features == 12 and getattr(enc.model, "pooler", None) is None
    out = enc(torch.randint(1, 40, (3, 6)))
    assert out.shape == (3, 12)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


@needs_transformers
def test_bert_is_deterministic_in_eval_and_freeze_keeps_the_transformer_fixed() -> None:
    torch.manual_seed(0)
    ids = torch.randint(1, 40, (2, 6))
    enc = BertEncoder((6,), TINY_BERT)
    enc.train()
    assert not torch.equal(enc(ids), enc(ids))  # the model's own dropout, in training only
    enc.eval()
    torch.testing.assert_close(enc(ids), enc(ids), atol=0, rtol=0)
    frozen = BertEncoder((6,), replace(TINY_BERT, proj=4, freeze=True)).train()
    assert not frozen.model.training and frozen.proj.training
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["proj.weight", "proj.bias"]


@needs_transformers
def test_bert_bad_directories_are_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bert.pretrained '.*nowhere' is not a directory"):
        BertEncoder((8,), BertOptions(pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"has no config.json"):
        BertEncoder((8,), BertOptions(pretrained=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="cannot be loaded"):  # a config but no weights
        BertEncoder((8,), BertOptions(pretrained=str(tmp_path)))


# -- vit ---------------------------------------------------------------------------------------


@needs_transformers
def test_vit_from_scratch_on_images_and_frames() -> None:
    torch.manual_seed(0)
    image = ViTEncoder((3, 32, 32), TINY_VIT).eval()
    assert image(torch.randn(2, 3, 32, 32)).shape == (2, 16) and image.num_features == 16
    clips = ViTEncoder((2, 3, 32, 32), TINY_VIT).eval()
    x = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        per_frame = torch.stack([clips.model(pixel_values=x[:, t]).last_hidden_state[:, 0] for t in range(2)], 1)
        torch.testing.assert_close(clips(x), per_frame.mean(dim=1))  # frames mean-pooled
    with pytest.raises(ValueError, match=r"takes 3×32×32 images, the input is 3×16×16"):
        ViTEncoder((3, 16, 16), TINY_VIT)


@needs_transformers
def test_vit_save_pretrained_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = ViTEncoder((1, 32, 32), replace(TINY_VIT, pooling="mean")).eval()
    enc.model.save_pretrained(tmp_path)
    loaded = ViTEncoder((1, 32, 32), ViTOptions(pretrained=str(tmp_path), pooling="mean")).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), enc(x))
    with pytest.raises(ValueError, match="resize the images"):
        ViTEncoder((1, 64, 64), ViTOptions(pretrained=str(tmp_path)))


# -- resnet18 from a torchvision checkpoint ----------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    """A torchvision-layout ResNet-18 file: ours (3 channels) + the ImageNet fc, no num_batches_tracked
    (as in torchvision's resnet18-f37072fd.pth)."""
    torch.manual_seed(0)
    reference = ResNet18((3, 32, 32))
    with torch.no_grad():
        for name, buffer in reference.named_buffers():  # non-default running stats, so loading shows
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    state |= {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("channels", [3, 1, 2])
def test_resnet_loads_a_torchvision_checkpoint_with_tsn_stems(
    checkpoint: tuple[Path, dict[str, Tensor]], channels: int
) -> None:
    path, state = checkpoint
    enc = ResNet18((channels, 32, 32), ResNet18Options(pretrained=str(path)))
    rgb = state["conv1.weight"]  # [64, 3, 7, 7]
    stem = rgb if channels == 3 else rgb.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1)
    torch.testing.assert_close(enc.conv1.weight, stem, atol=0, rtol=0)
    ours = enc.state_dict()
    for key, value in state.items():
        if key != "conv1.weight" and not key.startswith("fc."):
            torch.testing.assert_close(ours[key], value, atol=0, rtol=0)


def test_resnet_accepts_a_wrapped_data_parallel_checkpoint(
    checkpoint: tuple[Path, dict[str, Tensor]], tmp_path: Path
) -> None:
    _, state = checkpoint
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "dp.pth")
    enc = ResNet18((3, 32, 32), ResNet18Options(pretrained=str(tmp_path / "dp.pth")))
    key = "layer4.1.bn2.running_var"
    torch.testing.assert_close(enc.state_dict()[key], state[key], atol=0, rtol=0)


def test_resnet_checkpoint_errors_name_the_file_and_the_key(
    checkpoint: tuple[Path, dict[str, Tensor]], tmp_path: Path
) -> None:
    path, state = checkpoint
    with pytest.raises(ConfigError, match="needs width 64"):
        ResNet18((3, 32, 32), ResNet18Options(width=32, pretrained=str(path)))
    with pytest.raises(ConfigError, match=r"needs model.encoders.visual.width 64"):
        parse(EncoderConfig, {"name": "resnet18", "width": 8, "pretrained": "x.pth"}, "model.encoders.visual")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"corrupt.pth' is not a readable PyTorch checkpoint"):
        ResNet18((3, 32, 32), ResNet18Options(pretrained=str(tmp_path / "corrupt.pth")))
    torch.save({k: v for k, v in state.items() if k != "layer3.0.conv1.weight"}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"partial.pth': missing key layer3.0.conv1.weight"):
        ResNet18((3, 32, 32), ResNet18Options(pretrained=str(tmp_path / "partial.pth")))
    torch.save({**state, "layer5.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match=r"unexpected key layer5.weight"):
        ResNet18((3, 32, 32), ResNet18Options(pretrained=str(tmp_path / "extra.pth")))
    with pytest.raises(ConfigError, match="is not a file"):
        ResNet18((3, 32, 32), ResNet18Options(pretrained=str(tmp_path / "absent.pth")))


# -- mid-fusion refusal and config -------------------------------------------------------------


@needs_transformers
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_greedy_mid_fusion_refuses_encoders_without_stages(name: str) -> None:
    shapes: dict[str, tuple[int, ...]] = {"audio": (4, 6), "other": (6,) if name == "bert" else (3, 32, 32)}
    other = EncoderConfig("bert", TINY_BERT) if name == "bert" else EncoderConfig("vit", TINY_VIT)
    encoders = {"audio": EncoderConfig("cnn", CompactCNNOptions(channels=(4, 6))), "other": other}
    spec = ModelSpec(("audio", "other"), shapes, 3, encoders, mid_fusion=MidFusionSpec(2))
    message = f"encoder {name} has no stages: mid-fusion (method greedy, method.mmtm_stages) needs encoders such as"
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model(spec)
    assert build_model(replace(spec, mid_fusion=None)).mid_fusion is None  # late fusion alone is fine


def test_encoder_options_parse_from_config() -> None:
    raw = {
        "text": {"name": "bert", "pretrained": "/models/bert-base-uncased", "proj": 1024},
        "audio": {"name": "transformer", "pooling": "mean", "positional": "sinusoidal"},
        "visual": {"name": "vit", "pretrained": "/models/vit-b16"},
    }
    model = parse(ModelConfig, {"encoders": raw}, "model")
    assert model.encoders["text"].options == BertOptions(pretrained="/models/bert-base-uncased", proj=1024)
    assert model.encoders["audio"].options == SequenceTransformerOptions(pooling="mean", positional="sinusoidal")
    assert model.encoders["visual"].options == ViTOptions(pretrained="/models/vit-b16")
    with pytest.raises(ConfigError, match=r"model.encoders.text.pooling: 'avg' is not allowed"):
        parse(ModelConfig, {"encoders": {"text": {"name": "bert", "pooling": "avg"}}}, "model")
    with pytest.raises(ConfigError, match=r"model.encoders.audio.d_model \(10\) must be divisible"):
        parse(ModelConfig, {"encoders": {"audio": {"name": "transformer", "d_model": 10, "heads": 4}}}, "model")
