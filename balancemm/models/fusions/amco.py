"""Concat fusion followed by a class-space linear layer L* (AMCo's head, BalanceMM's ``linear_star``).

z = L*(W[h_1; …; h_M] + b), with L* = Linear(C, C). The per-modality logits are the concat head's
slices u_m = W_m h_m + b/M, taken before L*, so z = L*(Σ_m u_m). The AMCo method
(``balancemm/methods/amco.py``) masks the features h_m of the modalities it flags and runs the forward,
or, with ``mask_unit=class``, masks their u_m and fuses them with :meth:`combine`. The forward, used
everywhere else (evaluation, the Shapley metric), is exactly L*(fc_out(concat(h))).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from balancemm.models.fusions.concat import ConcatFusion
from balancemm.registry import FUSIONS


@FUSIONS.register("amco")
class AMCoFusion(ConcatFusion):
    """Concat head ``fc_out`` then ``linear_star``; :meth:`slice` gives the pre-L* terms u_m."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.linear_star = nn.Linear(num_classes, num_classes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Fused logits ``[B, C]`` = L*(fc_out(concat(h))) from features ``{m: [B, d_m]}``."""
        return self.linear_star(super().forward(features))

    def combine(self, parts: dict[str, Tensor]) -> Tensor:
        """Fused logits ``[B, C]`` = L*(Σ_m u_m) from (possibly masked) per-modality terms ``{m: [B, C]}``."""
        return self.linear_star(torch.stack([parts[m] for m in self.modalities]).sum(0))
