"""ResNet-18 in the OGM-GE conventions, written here so the package needs no torchvision.

* ``[C, H, W]`` input (a 1-channel spectrogram, an image, a 2-channel flow field): a standard
  ResNet-18 whose stem takes C channels, average-pooled over the final map.
* ``[T, C, H, W]`` input (several video frames): frames are folded into the batch, encoded
  independently, and the final maps are average-pooled over time and space together (OGM-GE's 3-D
  average pool), so frames are mean-pooled.

Module names follow the usual ResNet layout (``conv1``, ``bn1``, ``layer1``…``layer4``) so that
standard checkpoints map onto it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from balancemm.config import rng
from balancemm.models.encoders.base import Encoder
from balancemm.registry import ENCODERS


@dataclass(frozen=True)
class ResNet18Options:
    width: int = field(default=64, metadata=rng(ge=1))  # stem width; 64 is ResNet-18, tests use less


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


@ENCODERS.register("resnet18")
class ResNet18(Encoder):
    Options = ResNet18Options

    def __init__(self, input_shape: tuple[int, ...], options: ResNet18Options | None = None) -> None:
        super().__init__()
        options = options or ResNet18Options()
        if len(input_shape) not in (3, 4):
            raise ValueError(f"resnet18 takes [C, H, W] or [T, C, H, W] inputs, got {input_shape}")
        self.frames = len(input_shape) == 4
        channels = input_shape[-3]
        w = options.width
        self.conv1 = nn.Conv2d(channels, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, w, 1))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w, 1))
        self.layer4 = nn.Sequential(BasicBlock(4 * w, 8 * w, 2), BasicBlock(8 * w, 8 * w, 1))
        self.num_features = 8 * w
        for m in self.modules():  # the initialisation OGM-GE and BalanceMM use
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def enter(self, x: Tensor) -> Tensor:
        if self.frames:
            x = x.flatten(0, 1)  # [B, T, C, H, W] → [B·T, C, H, W]
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def exit(self, h: Tensor, batch_size: int) -> Tensor:
        # Mean over (time ×) space: for frames, the [B·T, C, h, w] map is pooled per clip.
        return h.reshape(batch_size, -1, h.shape[1], h.shape[2] * h.shape[3]).mean(dim=(1, 3))
