"""Which video frames a sample uses, and how they become the visual encoder's input.

Both follow the loaders of OGM-GE_CVPR2022, Modal-Imbalance-PMR and BalanceBenchmark: k frames, one per
equal segment of the clip (random inside it in training, its middle in evaluation); frames resized to
224×224 in evaluation, RandomResizedCrop(224) + horizontal flip in training (torchvision's transforms,
applied to each frame independently, as OGM-GE applies its transform frame by frame), then ImageNet
normalisation. Every random choice comes from the ``rng`` passed in; ``rng=None`` means evaluation and
is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


def frame_indices(n: int, k: int, rng: np.random.Generator | None) -> list[int]:
    """Choose ``k`` of ``n`` frames (0-based), one per segment of seg = n // k frames.

    Training (``rng`` given): ``i·seg + U[0, seg)`` for segment i; evaluation (``rng=None``): ``i·seg + seg // 2``.
    This is the rule of OGM-GE's and BalanceBenchmark's CREMA-D loaders and of PMR. With fewer frames
    than wanted (n < k) frames repeat: index ⌊i·n / k⌋, in training too.

    BalanceBenchmark's Kinetics-Sounds / VGGSound / BalancedAV loaders use a 1-based variant that we do
    not copy: test frame i·seg + max(⌊seg/2⌋, 1), training frames drawn from i·seg + 1 … i·seg + seg,
    both capped at frame 9 (8 for BalancedAV), and every frame is frame 1 when n ≤ 6. For a 10-frame clip
    it picks frames 0, 3, 6 (0-based) in evaluation where this rule picks 1, 4, 7, the segment middles.
    """
    if n < 1 or k < 1:
        raise ValueError(f"frame_indices: need n >= 1 and k >= 1, got n={n}, k={k}")
    if n < k:
        return [i * n // k for i in range(k)]
    seg = n // k
    offsets = rng.integers(0, seg, size=k) if rng is not None else np.full(k, seg // 2)
    return [i * seg + int(o) for i, o in enumerate(offsets)]


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of a crop covering a random
    8–100 % of the area with a log-uniform aspect ratio in [3/4, 4/3]; after 10 failed draws, the largest
    central crop whose ratio is within bounds."""
    area = height * width
    log_lo, log_hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < _CROP_RATIO[0]:
        w, h = width, round(width / _CROP_RATIO[0])
    elif ratio > _CROP_RATIO[1]:
        w, h = round(height * _CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(x: Tensor, size: int) -> Tensor:
    """``[N, C, H, W]`` → ``[N, C, size, size]``: bilinear with antialiasing, as torchvision's Resize."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def normalise(x: Tensor) -> Tensor:
    """``[..., 3, H, W]`` RGB values in 0‥255 → /255, then ImageNet mean and std per channel."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x / 255 - mean) / std


def crop_resize_flip(
    x: Tensor, size: int, rng: np.random.Generator | None, flip_sign: tuple[float, ...] | None = None
) -> Tensor:
    """``[T, C, H, W]`` float frames → ``[T, C, size, size]``.

    Evaluation (``rng=None``): resize to size × size. Training: per frame an independent
    RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) and a horizontal flip with probability
    0.5; a flipped frame's channels are multiplied by ``flip_sign`` when given (optical flow: u changes
    sign when the image is mirrored).
    """
    if rng is None:
        return resize(x, size)
    height, width = x.shape[-2:]
    sign = None if flip_sign is None else torch.tensor(flip_sign).view(1, -1, 1, 1)
    crops = []
    for frame in x:
        top, left, h, w = crop_box(height, width, rng)
        crop = resize(frame[None, :, top : top + h, left : left + w], size)
        if rng.random() < 0.5:
            crop = crop.flip(-1) if sign is None else crop.flip(-1) * sign
        crops.append(crop)
    return torch.cat(crops)


def frames_to_tensor(frames: np.ndarray, size: int, rng: np.random.Generator | None) -> Tensor:
    """``[T, H, W, 3]`` uint8 RGB frames → ``[T, 3, size, size]`` float32, ImageNet-normalised.

    Evaluation (``rng=None``): resize to size × size (``Resize((size, size))``). Training: per frame an
    independent RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) and a horizontal flip with
    probability 0.5 (:func:`crop_resize_flip`). Resizing works on floats, so values differ from
    torchvision on PIL images (which rounds the resized image to uint8) by at most half a grey level.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames_to_tensor: expected [T, H, W, 3] frames, got shape {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return normalise(crop_resize_flip(x, size, rng))
