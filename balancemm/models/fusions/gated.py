"""Gated fusion (OGM-GE's GatedFusion, x_gate=True), generalised to M modalities.

OGM-GE: out = fc_out(σ(fc_x(h_x)) ⊙ fc_y(h_y)). With M modalities the last one in sorted order is
gated by the product of every other modality's sigmoid gate; for M = 2 this is OGM-GE's module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from balancemm.models.fusions.base import Fusion
from balancemm.registry import FUSIONS


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.target = self.modalities[-1]
        d = dims[self.target]
        self.fc = nn.ModuleDict({m: nn.Linear(dims[m], d) for m in self.modalities})
        self.fc_out = nn.Linear(d, num_classes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        h = self.fc[self.target](features[self.target])
        for m in self.modalities[:-1]:
            h = torch.sigmoid(self.fc[m](features[m])) * h
        return self.fc_out(h)
