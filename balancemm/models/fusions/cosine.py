"""Cosine fusion (MMCosine's head): z_c = Σ_m s·cos(h_m, W_m^(c)), no bias.

Xu, Feng, Zhang, Hu, ICASSP 2023 (GeWu-Lab/MMCosine_ICASSP23, ``main_CD.py: train_epoch``). The weight
is the concat head's ``fc_out.weight`` ``[C, Σ d_m]``; each class row is L2-normalised *separately* in
every modality's column block, each feature ``h_m`` is L2-normalised per sample, and the per-modality
cosines are scaled by s and summed, so |z_m,c| ≤ s and |z_c| ≤ M·s.

Normalisation is ``F.normalize`` (x / max(‖x‖, 1e-12)), as in the original: a zero feature vector
(a modality masked out by feature masking) gives cosine 0 for every class instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balancemm.models.fusions.base import Fusion
from balancemm.registry import FUSIONS


@FUSIONS.register("cosine")
class CosineFusion(Fusion):
    """Sum of per-modality scaled cosine logits.

    Args:
        dims: modality → feature size d_m.
        num_classes: C.
        scale: s, the temperature every cosine is multiplied by (MMCosine's ``--scaling``, default 10).
    """

    supports_slice = True

    def __init__(self, dims: dict[str, int], num_classes: int, scale: float = 10.0) -> None:
        super().__init__(dims, num_classes)
        # The original keeps nn.Linear's bias but never uses it; it is left out rather than kept
        # as a parameter that never receives a gradient.
        self.fc_out = nn.Linear(sum(dims.values()), num_classes, bias=False)
        self.scale = scale

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Fused logits ``[B, C]`` from features ``{m: [B, d_m]}``."""
        return torch.stack(list(self.slice(features).values())).sum(0)

    def slice(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality logits ``{m: [B, C]}``: z_m = s · normalize(h_m) · normalize(W_m)ᵀ (rows)."""
        out, start = {}, 0
        for m in self.modalities:
            w = self.fc_out.weight[:, start : start + self.dims[m]]
            out[m] = self.scale * F.normalize(features[m], dim=1) @ F.normalize(w, dim=1).t()
            start += self.dims[m]
        return out
