"""A compact CNN sized for the embedded dataset (and any small 1-D or 2-D input)."""

from __future__ import annotations

from torch import Tensor, nn

from balancemm.catalog.models import CompactCNNOptions
from balancemm.models.encoders.base import Encoder
from balancemm.registry import ENCODERS


@ENCODERS.register("cnn")
class CompactCNN(Encoder):
    """Conv → BN → ReLU stages, then global average pooling.

    The input layout decides the convolution: ``[C, L]`` → 1-D over L with C channels (a spectrogram
    ``[freq, time]`` convolves over time with frequency bins as channels; a sequence of word vectors
    ``[dim, tokens]`` over tokens); ``[C, H, W]`` → 2-D.
    """

    Options = CompactCNNOptions

    def __init__(self, input_shape: tuple[int, ...], options: CompactCNNOptions | None = None) -> None:
        super().__init__()
        options = options or CompactCNNOptions()
        if len(input_shape) not in (2, 3):
            raise ValueError(f"cnn encoder takes [C, L] or [C, H, W] inputs, got {input_shape}")
        conv = nn.Conv1d if len(input_shape) == 2 else nn.Conv2d
        norm = nn.BatchNorm1d if len(input_shape) == 2 else nn.BatchNorm2d
        blocks, width = [], input_shape[0]
        for i, out in enumerate(options.channels):
            blocks.append(
                nn.Sequential(
                    conv(
                        width, out, options.kernel, stride=1 if i == 0 else 2, padding=options.kernel // 2, bias=False
                    ),
                    norm(out),
                    nn.ReLU(inplace=True),
                )
            )
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.num_features = width

    def stages(self) -> list[nn.Module]:
        return list(self.blocks)

    def exit(self, h: Tensor, batch_size: int) -> Tensor:
        return h.flatten(2).mean(dim=2)
