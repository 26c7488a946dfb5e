"""Frame choice and image transforms: hand-computed indices, the crop rule, normalisation, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balancemm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_box, frame_indices, frames_to_tensor
from tests.fixtures.media import color_frames


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [
        (10, 3, [1, 4, 7]),  # seg 3: middles 0·3 + 1, 1·3 + 1, 2·3 + 1
        (9, 3, [1, 4, 7]),
        (3, 2, [0, 1]),  # seg 1: offset 0
        (5, 2, [1, 3]),  # seg 2: the last frame is never used
        (7, 3, [1, 3, 5]),
        (2, 2, [0, 1]),
        (3, 1, [1]),
        (2, 3, [0, 0, 1]),  # n < k: ⌊i·2/3⌋
        (1, 3, [0, 0, 0]),
    ],
)
def test_evaluation_indices_by_hand(n: int, k: int, expected: list[int]) -> None:
    assert frame_indices(n, k, None) == expected


def test_training_indices_stay_in_their_segments_and_cover_them() -> None:
    seen: list[set[int]] = [set(), set(), set()]
    for seed in range(200):
        picked = frame_indices(11, 3, np.random.default_rng(seed))  # seg 3: segments [0, 3), [3, 6), [6, 9)
        for i, index in enumerate(picked):
            assert 3 * i <= index < 3 * i + 3
            seen[i].add(index)
    assert seen == [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}]


def test_fewer_frames_than_wanted_repeat_in_training_too() -> None:
    assert frame_indices(2, 3, np.random.default_rng(0)) == [0, 0, 1]
    with pytest.raises(ValueError):
        frame_indices(0, 3, None)


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_evaluation_resizes_and_normalises() -> None:
    frames = color_frames(2, 48, 64, seed=5)
    out = frames_to_tensor(frames, 32, None)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    for t in range(2):
        expected = _normalised(frames[t, 0, 0]).view(3, 1, 1).expand(3, 32, 32)
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=0)
    # Antialiasing: 3-px stripes shrunk 8× average out to about 100 (point sampling would give 0, 100, 200).
    stripes = np.zeros((1, 96, 96, 3), dtype=np.uint8)
    stripes[:, :, np.arange(96) % 6 < 3] = 200
    grey = frames_to_tensor(stripes, 12, None)[0, 0] * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255
    assert float((grey - 100).abs().max()) < 8


def test_training_is_per_frame_random_and_seeded() -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 48, 64, 3), dtype=np.uint8)
    a = frames_to_tensor(frames, 32, np.random.default_rng(1))
    assert a.shape == (3, 3, 32, 32)
    torch.testing.assert_close(a, frames_to_tensor(frames, 32, np.random.default_rng(1)))
    assert not torch.allclose(a, frames_to_tensor(frames, 32, np.random.default_rng(2)))
    same = np.repeat(frames[:1], 3, axis=0)  # identical frames get independent crops
    b = frames_to_tensor(same, 32, np.random.default_rng(3))
    assert not torch.allclose(b[0], b[1]) and not torch.allclose(b[1], b[2])
    constant = color_frames(2, 48, 64, seed=9)  # any crop or flip of a solid frame is the solid frame
    torch.testing.assert_close(
        frames_to_tensor(constant, 32, np.random.default_rng(4)), frames_to_tensor(constant, 32, None)
    )


def test_training_flips_about_half_the_frames() -> None:
    frame = np.zeros((1, 40, 40, 3), dtype=np.uint8)
    frame[:, :, 20:] = 255  # left dark, right bright: a flip puts the bright side left
    flipped = 0
    for seed in range(200):
        out = frames_to_tensor(frame, 16, np.random.default_rng(seed))[0, 0]
        flipped += int(out[:, 0].mean() > out[:, -1].mean())
    assert 70 < flipped < 130


def testcrop_box_follows_torchvision() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = crop_box(48, 64, rng)
        assert 0 <= top <= 48 - h and 0 <= left <= 64 - w
        assert 0.08 * 48 * 64 * 0.8 <= h * w <= 48 * 64  # rounding of h and w can undershoot the area slightly
        assert 3 / 4 - 0.1 < w / h < 4 / 3 + 0.1
    # A 10×1000 strip: no random box fits in 10 attempts (an area ≥ 800 px needs h ≥ 24), so the fallback:
    # the full height and w = round(10 · 4/3) = 13, centred at left = (1000 − 13) // 2 = 493.
    assert crop_box(10, 1000, np.random.default_rng(0)) == (0, 493, 10, 13)
    # A 1000×10 column: the full width and h = round(10 / (3/4)) = 13, centred at top = (1000 − 13) // 2 = 493.
    assert crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)
