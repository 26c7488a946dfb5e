"""ResNet-18 in the OGM-GE conventions, written here so the package needs no torchvision.

* ``[C, H, W]`` input (a 1-channel spectrogram, an image, a 2-channel flow field): a standard
  ResNet-18 whose stem takes C channels, average-pooled over the final map.
* ``[T, C, H, W]`` input (several video frames): frames are folded into the batch, encoded
  independently, and the final maps are average-pooled over time and space together (OGM-GE's 3-D
  average pool), so frames are mean-pooled.

Module names follow the usual ResNet layout (``conv1``, ``bn1``, ``layer1``…``layer4``) so that
standard checkpoints map onto it: ``pretrained`` loads a local torchvision ResNet-18 state dict
(``resnet18-f37072fd.pth``), without its ``fc``. Its RGB stem is adapted to other channel counts by
TSN's cross-modality initialisation (Wang et al., "Temporal Segment Networks", ECCV 2016): the filters
averaged over R, G, B and repeated once per input channel (1 for a spectrogram, 2 for optical flow).
The weights expect ImageNet-normalised RGB; normalising the inputs is the dataset's job.

Deviations from BalanceMM: BalanceMM loads its checkpoint with ``strict=False``, which silently skips
missing or misnamed keys yet still fails on the 1-channel audio stem, and drops the flow stem (random
init). Here every key must match except ``fc.*`` (one ConfigError naming the file and the key), and
1- and 2-channel stems start from the RGB filters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from balancemm.catalog.models import ResNet18Options
from balancemm.errors import ConfigError, first_line
from balancemm.models.encoders.base import Encoder
from balancemm.registry import ENCODERS


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
        if options.pretrained:
            if w != 64:
                raise ConfigError(f"resnet18.pretrained needs width 64 (ResNet-18's), got {w}")
            self.load_state_dict(torchvision_state(options.pretrained, self.state_dict()))

    def enter(self, x: Tensor) -> Tensor:
        if self.frames:
            x = x.flatten(0, 1)  # [B, T, C, H, W] → [B·T, C, H, W]
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def exit(self, h: Tensor, batch_size: int) -> Tensor:
        # Mean over (time ×) space: for frames, the [B·T, C, h, w] map is pooled per clip.
        return h.reshape(batch_size, -1, h.shape[1], h.shape[2] * h.shape[3]).mean(dim=(1, 3))


def torchvision_state(path: str, own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A full state dict for our ResNet-18 (``own``: its current state) from a torchvision checkpoint.

    Accepts a plain state dict or ``{"state_dict": ...}``, with or without DataParallel's ``module.``
    prefix; drops ``fc.*``; keeps ``own``'s ``num_batches_tracked`` where the checkpoint predates them.
    A 3-channel ``conv1`` is adapted to ``own``'s channel count C: the mean over RGB, repeated C times.
    Anything else that does not match is a ConfigError naming the file and the key.
    """
    where = f"resnet18.pretrained {path!r}"
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{where} is not a file (expected a torchvision ResNet-18 .pth state dict)")
    try:
        raw = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, not a checkpoint…: the types vary
        raise ConfigError(f"{where} is not a readable PyTorch checkpoint: {first_line(exc)}") from None
    if isinstance(raw, Mapping) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ConfigError(f"{where} is not a state dict of tensors")
    state = {str(k).removeprefix("module."): v for k, v in raw.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ConfigError(f"{where}: unexpected key {unexpected[0]} (not a ResNet-18 state dict?)")
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]}")
    stem, channels = state["conv1.weight"], own["conv1.weight"].shape[1]
    if stem.dim() == 4 and stem.shape[1] == 3 and channels != 3:  # TSN: RGB mean, once per channel
        state["conv1.weight"] = stem.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1)
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ConfigError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    return {**own, **state}
