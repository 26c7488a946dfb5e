"""Sum fusion (OGM-GE's SumFusion for M modalities): z = Σ_m (W_m h_m + b_m).

With ``average=True`` the fused logits are the mean of the per-modality logits instead of their sum
(LFM's late fusion, ō = (o_a + o_v)/2).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from balancemm.models.fusions.base import Fusion
from balancemm.registry import FUSIONS


@FUSIONS.register("sum")
class SumFusion(Fusion):
    supports_slice = True

    def __init__(self, dims: dict[str, int], num_classes: int, average: bool = False) -> None:
        super().__init__(dims, num_classes)
        self.fc = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})
        self.average = average

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        parts = self.slice(features)
        total = torch.stack([parts[m] for m in self.modalities]).sum(0)
        return total / len(self.modalities) if self.average else total

    def slice(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.fc[m](features[m]) for m in self.modalities}

    def modality_head_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """The parameters of one modality's linear head, the only ones its slice z_m = W_m h_m + b_m reads:
        W_m ``[C, d_m]`` then b_m ``[C]``."""
        return self.fc[modality].parameters()
