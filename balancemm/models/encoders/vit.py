"""A Vision Transformer through HuggingFace ``transformers`` (``ViTModel``).

ViT: Dosovitskiy et al. "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale." ICLR 2021. The paper behind BalanceMM names ViT among its backbones; BalanceMM's ``ViT_B``
(torchvision ``vit_b_16``) cannot run (its config lacks ``output_dim``, a KeyError, and its input
reshaping is inconsistent), so this is the working equivalent, not a port.

* ``[C, H, W]`` input: patches of ``patch_size``, a [CLS] token, pre-norm Transformer layers, final
  LayerNorm; the feature is the [CLS] state (``pooling: cls``, as ViT classifies) or the mean of the
  patch tokens (``mean``).
* ``[T, C, H, W]`` input (video frames): frames are folded into the batch, encoded independently and
  their features mean-pooled over time, as ``resnet18`` does.

Weights come from a local ``save_pretrained`` directory (``ViTModel.from_pretrained``; a checkpoint of a
ViT classifier works too, its head is dropped), or the model is built from scratch from the size
options with ``num_channels`` taken from the input. The input must already have the model's image
size (resize in the dataset). Nothing is ever downloaded.

Deviations from BalanceMM: a working encoder (see above); HuggingFace's pooler (tanh of a dense
layer on [CLS], absent from the ViT paper's classifier) is not built; no stages, so mid-fusion
refuses a vit encoder (``Encoder.stages``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from balancemm.catalog.models import ViTOptions
from balancemm.models.encoders.base import Encoder, load_local_pretrained, missing_transformers
from balancemm.registry import ENCODERS

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@ENCODERS.register("vit")
class ViTEncoder(Encoder):
    """``[B, C, H, W]`` or ``[B, T, C, H, W]`` → ``[B, hidden]``. One call: no stages (no mid-fusion)."""

    Options = ViTOptions

    def __init__(self, input_shape: tuple[int, ...], options: ViTOptions | None = None) -> None:
        super().__init__()
        options = options or ViTOptions()
        if len(input_shape) not in (3, 4):
            raise ValueError(f"vit takes [C, H, W] or [T, C, H, W] inputs, got {input_shape}")
        try:
            from transformers import ViTConfig, ViTModel
        except ImportError:
            raise missing_transformers("vit") from None
        self.frames = len(input_shape) == 4
        channels, height, width = input_shape[-3:]
        self.model: PreTrainedModel
        if options.pretrained:
            self.model = load_local_pretrained(ViTModel, options.pretrained, "vit", add_pooling_layer=False)
        else:
            vit_config = ViTConfig(
                image_size=options.image_size,
                patch_size=options.patch_size,
                num_channels=channels,
                hidden_size=options.hidden,
                num_hidden_layers=options.layers,
                num_attention_heads=options.heads,
                intermediate_size=options.intermediate,
            )
            self.model = ViTModel(vit_config, add_pooling_layer=False)
        config = self.model.config
        image_size = config.image_size  # an int, or (H, W) in some saved configs
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if (height, width) != size or channels != config.num_channels:
            raise ValueError(
                f"vit: the model takes {config.num_channels}×{size[0]}×{size[1]} images, "
                f"the input is {channels}×{height}×{width}"
                + (" (set image_size)" if not options.pretrained else " (resize the images in the dataset)")
            )
        self.pooling = options.pooling
        self.num_features = int(config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` or ``[B, T, C, H, W]`` → ``[B, hidden]``."""
        batch_size = x.shape[0]
        if self.frames:
            x = x.flatten(0, 1)  # [B, T, C, H, W] → [B·T, C, H, W]
        h = self.model(pixel_values=x).last_hidden_state  # [N, 1 + patches, hidden], [CLS] first
        pooled = h[:, 0] if self.pooling == "cls" else h[:, 1:].mean(dim=1)
        return pooled.reshape(batch_size, -1, pooled.shape[1]).mean(dim=1)  # frames: mean over time
