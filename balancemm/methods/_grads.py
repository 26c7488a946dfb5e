"""Gradient helpers of the gradient-level methods: MMPareto (``flat``, ``min_norm_two``), OGM-GE (``conv_weights``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def flat(grads: Sequence[Tensor]) -> Tensor:
    """Concatenate gradient tensors into one vector ``[Σ numel]``."""
    return torch.cat([g.reshape(-1) for g in grads])


def min_norm_two(g1: Tensor, g2: Tensor) -> float:
    """Weight α₁ of ``g1`` in the min-norm point of the segment between two gradients.

    Solves min_{α∈[0,1]} ‖α g₁ + (1−α) g₂‖² analytically (Sener & Koltun 2018, the 2-task case) with
    a = ‖g₁‖², c = ‖g₂‖², e = ⟨g₁, g₂⟩: α₁ = (c − e)/(a + c − 2e), clamped to 0.999 when e ≥ a and
    0.001 when e ≥ c, as the solver MMPareto ships does.
    """
    a, c, e = float(g1 @ g1), float(g2 @ g2), float(g1 @ g2)
    if e >= a:
        return 0.999
    if e >= c:
        return 0.001
    return (c - e) / (a + c - 2 * e)


def conv_weights(module: nn.Module) -> list[Tensor]:
    """The kernels of every convolution inside ``module`` (by module type, not by name)."""
    return [m.weight for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
