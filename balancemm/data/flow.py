"""Optical flow for UCF-101: the recipes that compute it ("flow profiles"), its uint8 storage, and the
loader's flow transform.

**Recipes.** Both run OpenCV (``opencv-contrib-python-headless``: TV-L1 lives in the contrib build) on
the greyscale (``cv2.COLOR_RGB2GRAY``) of two frames at the stored size, and return the forward flow
``[H, W, 2]`` = (u, v) in pixels (u > 0: motion to the right, v > 0: motion down):

* ``tvl1`` (default): ``cv2.optflow.DualTVL1OpticalFlow_create`` with OpenCV's defaults, passed
  explicitly so that another OpenCV release cannot change them (tau 0.25, λ 0.15, θ 0.3, 5 scales,
  5 warps, ε 0.01, 30 inner × 10 outer iterations, scale step 0.8, γ 0, 5 × 5 median filtering).
  TV-L1 is the flow of the two-stream networks and of the ``dense_flow`` extractor behind the UCF-101
  frame/flow folders in circulation, which runs OpenCV's CUDA TV-L1 with the same tau, λ, θ, scales,
  warps and ε (300 iterations); the CPU implementation used here is not bit-identical to it.
* ``farneback``: ``cv2.calcOpticalFlowFarneback`` with the parameters of OpenCV's own example
  (pyramid scale 0.5, 3 levels, window 15, 3 iterations, poly_n 5, poly_sigma 1.2): about 40 times
  faster than TV-L1 and blurrier.

Every parameter, the OpenCV version and a recipe ``version`` go into the prepared data's manifest
(:meth:`FlowProfile.params`); ``version`` is bumped whenever a recipe's output changes.

**Storage** follows ``dense_flow``: each component is clipped to ±``bound`` pixels (20) and mapped
linearly onto 0‥255, so +20 → 255, −20 (and −25) → 0 and 0 → 127.5. dense_flow truncates 127.5 to 127;
here values are rounded half up (0 → 128), which halves the worst quantisation error (0.08 px instead of
0.16 px). Either way the dequantisation is the same, ``q / 127.5 − 1`` = flow / bound ∈ [−1, 1].

**Loader** (:func:`flow_to_tensor`): the same geometry as the RGB frames
(:func:`balancemm.data.transforms.frames_to_tensor`): resize in evaluation; in training a random
resized crop and a horizontal flip per frame. A horizontal flip mirrors the motion too, so it
negates u. Values stay flow / bound of the stored frames: like TSN and BalanceMM, crops and resizes do
not rescale the displacements.

Deviations from BalanceMM (``balancemm/datasets/ucf101_dataset.py``): BalanceMM reads the u and v jpgs as
greyscale images in [0, 1] (zero motion = 0.5, no normalisation) and flips u and v independently, each
with its own coin, without negating u: half of its training samples mirror one map and not the other,
and a mirrored u keeps the sign of the unmirrored motion. Here flow is zero-centred (zero motion ≈ 0) and
a flip mirrors both maps and negates u.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from balancemm.data.transforms import crop_resize_flip
from balancemm.errors import DataError

FLOW_BOUND = 20.0  # pixels; dense_flow's default bound
LIBRARY = "opencv-contrib-python-headless"


@dataclass(frozen=True)
class FlowProfile:
    """A named optical-flow recipe: an OpenCV algorithm and all its parameters."""

    name: str
    description: str
    algorithm: str  # the OpenCV function
    parameters: Mapping[str, float | int | bool] = field(default_factory=dict)  # in the function's order
    bound: float = FLOW_BOUND
    version: int = 1

    def params(self) -> dict[str, Any]:
        """Everything that decides the stored flow, for the manifest."""
        cv2 = _cv2()
        return {
            "name": self.name,
            "description": self.description,
            "library": LIBRARY,
            "library_version": cv2.__version__,
            "algorithm": self.algorithm,
            "parameters": dict(self.parameters),
            "input": "greyscale (cv2.COLOR_RGB2GRAY) of the stored frames (shorter side --frame-size)",
            "pairs": "each stored 1-fps frame and the next decoded frame of the video",
            "bound": self.bound,
            "quantisation": "uint8 = floor(255 * (clip(flow, -bound, bound) + bound) / (2 * bound) + 0.5)",
            "layout": "[T, H, W, 2] uint8, (u, v), u > 0 rightwards, v > 0 downwards",
            "version": self.version,
        }

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Forward flow from ``first`` to ``second`` (``[H, W]`` uint8 grey) → ``[H, W, 2]`` float32 pixels."""
        cv2 = _cv2()
        p = self.parameters
        if self.algorithm == "cv2.optflow.DualTVL1OpticalFlow_create":
            # Positional: the keyword of the inner iterations is misspelt in some OpenCV releases.
            tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(*p.values())
            flow = tvl1.calc(first, second, None)
        else:
            flow = cv2.calcOpticalFlowFarneback(first, second, None, *p.values())
        return np.asarray(flow, dtype=np.float32)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise DataError(f"optical flow needs OpenCV's contrib build: pip install {LIBRARY}") from None
    if not hasattr(cv2, "optflow"):
        raise DataError(
            f"cv2 {cv2.__version__} has no optflow module (TV-L1): uninstall opencv-python(-headless) and "
            f"pip install {LIBRARY}"
        )
    return cv2


TVL1 = FlowProfile(
    "tvl1",
    "TV-L1 (Zach, Pock & Bischof 2007; Wedel et al. 2009) with OpenCV's defaults, as the two-stream / dense_flow tools",
    "cv2.optflow.DualTVL1OpticalFlow_create",
    {
        "tau": 0.25,
        "lambda": 0.15,
        "theta": 0.3,
        "nscales": 5,
        "warps": 5,
        "epsilon": 0.01,
        "inner_iterations": 30,
        "outer_iterations": 10,
        "scale_step": 0.8,
        "gamma": 0.0,
        "median_filtering": 5,
        "use_initial_flow": False,
    },
)
FARNEBACK = FlowProfile(
    "farneback",
    "Farnebäck (2003) polynomial expansion with the parameters of OpenCV's optical-flow example",
    "cv2.calcOpticalFlowFarneback",
    {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2, "flags": 0},
)
FLOW_PROFILES: dict[str, FlowProfile] = {p.name: p for p in (TVL1, FARNEBACK)}


def flow_profile(name: str) -> FlowProfile:
    if name not in FLOW_PROFILES:
        raise DataError(f"unknown flow profile {name!r}; choose one of {', '.join(FLOW_PROFILES)}")
    return FLOW_PROFILES[name]


def frame_flow(first: np.ndarray, second: np.ndarray, profile: FlowProfile) -> np.ndarray:
    """Stored flow between two RGB frames ``[H, W, 3]`` uint8 → ``[H, W, 2]`` uint8 (:func:`quantise`)."""
    cv2 = _cv2()
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in (first, second)]
    return quantise(profile(*grey), profile.bound)


def quantise(flow: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """Flow in pixels → uint8 the dense_flow way: clip to ±bound, map linearly to 0‥255, round half up."""
    scaled = (np.clip(np.asarray(flow, dtype=np.float64), -bound, bound) + bound) * (255.0 / (2 * bound))
    return np.floor(scaled + 0.5).astype(np.uint8)


def dequantise(stored: np.ndarray) -> np.ndarray:
    """uint8 flow (ours or a dense_flow jpg) → float32 flow / bound in [−1, 1] (0 → −1, 255 → 1)."""
    return np.asarray(stored, dtype=np.float32) / 127.5 - 1.0


def flow_to_tensor(flow: np.ndarray, size: int, rng: np.random.Generator | None) -> Tensor:
    """``[T, H, W, 2]`` uint8 stored flow → ``[T, 2, size, size]`` float32 flow / bound.

    Evaluation (``rng=None``): resize to size × size. Training: the RGB frames' geometric augmentation
    (:func:`balancemm.data.transforms.crop_resize_flip`), whose flip mirrors both maps and negates u.
    """
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow_to_tensor: expected [T, H, W, 2] flow, got shape {flow.shape}")
    x = torch.from_numpy(dequantise(flow)).permute(0, 3, 1, 2)
    return crop_resize_flip(x, size, rng, flip_sign=(-1.0, 1.0))
