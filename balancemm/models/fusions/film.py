"""FiLM fusion (OGM-GE's FiLM, x_film=True), generalised to M modalities.

OGM-GE conditions the second modality's feature on the first: (γ, β) = fc(h_x), out = fc_out(γ ⊙ h_y + β).
With M modalities the last one in sorted order is the conditioned feature and every other modality
applies its own (γ_m, β_m) in turn; for M = 2 this is exactly OGM-GE's module.
"""

from __future__ import annotations

from torch import Tensor, nn

from balancemm.models.fusions.base import Fusion
from balancemm.registry import FUSIONS


@FUSIONS.register("film")
class FiLMFusion(Fusion):
    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.target = self.modalities[-1]
        d = dims[self.target]
        self.film = nn.ModuleDict({m: nn.Linear(dims[m], 2 * d) for m in self.modalities[:-1]})
        self.fc_out = nn.Linear(d, num_classes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        h = features[self.target]
        for m in self.modalities[:-1]:
            gamma, beta = self.film[m](features[m]).chunk(2, dim=1)
            h = gamma * h + beta
        return self.fc_out(h)
