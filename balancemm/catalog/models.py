"""Every built-in encoder's options (``model.encoders.<modality>``) and every fusion's name.

The encoders and fusions themselves are in ``balancemm/models``; their options are here so that a
config is resolved and checked without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from balancemm.errors import ConfigError
from balancemm.registry import ENCODER_OPTIONS, FUSION_NAMES
from balancemm.schema import rng


@ENCODER_OPTIONS.register("cnn")
@dataclass(frozen=True)
class CompactCNNOptions:
    channels: tuple[int, ...] = (16, 32, 64)  # one conv stage each; stages after the first stride 2
    kernel: int = field(default=3, metadata=rng(ge=1))


@ENCODER_OPTIONS.register("resnet18")
@dataclass(frozen=True)
class ResNet18Options:
    width: int = field(default=64, metadata=rng(ge=1))  # stem width; 64 is ResNet-18, tests use less
    pretrained: str = ""  # a local torchvision-format ResNet-18 state dict (.pth); "" = from scratch

    def _validate(self, path: str) -> None:
        if self.pretrained and self.width != 64:
            raise ConfigError(f"{path}.pretrained needs {path}.width 64 (ResNet-18's), got {self.width}")


@ENCODER_OPTIONS.register("bert")
@dataclass(frozen=True)
class BertOptions:
    pretrained: str = ""  # a local save_pretrained directory; "" = from scratch with the sizes below
    # From-scratch sizes (BERT-base by default); ignored with `pretrained`.
    hidden: int = field(default=768, metadata=rng(ge=1))
    layers: int = field(default=12, metadata=rng(ge=1))
    heads: int = field(default=12, metadata=rng(ge=1))
    intermediate: int = field(default=3072, metadata=rng(ge=1))
    vocab_size: int = field(default=30522, metadata=rng(ge=1))
    max_positions: int = field(default=512, metadata=rng(ge=1))
    pooling: Literal["pooler", "cls", "mean"] = "pooler"  # pooler = tanh(Linear([CLS])) as BalanceMM
    proj: int = field(default=0, metadata=rng(ge=0))  # Linear to this width after pooling (BMM 1024); 0 = none
    freeze: bool = False  # fixed Transformer (eval mode, no gradients); the projection still trains

    def _validate(self, path: str) -> None:
        if not self.pretrained and self.hidden % self.heads:
            raise ConfigError(f"{path}.hidden ({self.hidden}) must be divisible by {path}.heads ({self.heads})")


@ENCODER_OPTIONS.register("transformer")
@dataclass(frozen=True)
class SequenceTransformerOptions:
    d_model: int = field(default=1024, metadata=rng(ge=1))
    layers: int = field(default=2, metadata=rng(ge=1))
    heads: int = field(default=4, metadata=rng(ge=1))
    feedforward: int = field(default=2048, metadata=rng(ge=1))  # hidden width of each layer's MLP
    dropout: float = field(default=0.1, metadata=rng(ge=0, lt=1))
    pooling: Literal["last", "mean"] = "last"  # last time step's hidden state (BalanceMM) | mean over time
    positional: Literal["none", "sinusoidal"] = "none"  # none (BalanceMM) | fixed sinusoidal table (MulT)

    def _validate(self, path: str) -> None:
        if self.d_model % self.heads:
            raise ConfigError(f"{path}.d_model ({self.d_model}) must be divisible by {path}.heads ({self.heads})")


@ENCODER_OPTIONS.register("vit")
@dataclass(frozen=True)
class ViTOptions:
    pretrained: str = ""  # a local save_pretrained directory; "" = from scratch with the sizes below
    # From-scratch sizes (ViT-B/16 by default); ignored with `pretrained`.
    image_size: int = field(default=224, metadata=rng(ge=1))  # must equal the input's H and W
    patch_size: int = field(default=16, metadata=rng(ge=1))
    hidden: int = field(default=768, metadata=rng(ge=1))
    layers: int = field(default=12, metadata=rng(ge=1))
    heads: int = field(default=12, metadata=rng(ge=1))
    intermediate: int = field(default=3072, metadata=rng(ge=1))
    pooling: Literal["cls", "mean"] = "cls"  # the [CLS] state | the mean of the patch tokens

    def _validate(self, path: str) -> None:
        if self.pretrained:
            return
        if self.hidden % self.heads:
            raise ConfigError(f"{path}.hidden ({self.hidden}) must be divisible by {path}.heads ({self.heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{path}.image_size ({self.image_size}) must be a multiple of {path}.patch_size")


FUSION_NAMES.register("amco", aliases=("AMCoFusion",))(None)
FUSION_NAMES.register("boosted", aliases=("BoostedFusion",))(None)
FUSION_NAMES.register("concat", aliases=("ConcatFusion",))(None)
FUSION_NAMES.register("cosine", aliases=("CosineFusion",))(None)
FUSION_NAMES.register("film", aliases=("FiLM",))(None)
FUSION_NAMES.register("gated", aliases=("GatedFusion",))(None)
FUSION_NAMES.register("shared", aliases=("SharedHead",))(None)
FUSION_NAMES.register("sum", aliases=("SumFusion",))(None)
