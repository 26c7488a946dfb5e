"""Per-modality score helpers shared by the methods that compare a modality with the others."""

from __future__ import annotations

import torch
from torch import Tensor


def others_sum(scores: Tensor) -> Tensor:
    """Σ_{j≠m} s_j for every m, ``[M]`` from ``[M]``.

    A 0/1 matrix product rather than Σ s − s_m: for M = 2 it is exactly the other score, so the two
    modalities' ratios are exact inverses and their comparisons can never disagree through rounding.
    """
    m = scores.numel()
    return (1 - torch.eye(m, dtype=scores.dtype, device=scores.device)) @ scores
