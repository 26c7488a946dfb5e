"""Sum fusion (OGM-GE's SumFusion for M modalities): z = Σ_m (W_m h_m + b_m)."""

from __future__ import annotations

from torch import Tensor, nn

from balancemm.models.fusions.base import Fusion
from balancemm.registry import FUSIONS


@FUSIONS.register("sum", aliases=("SumFusion",))
class SumFusion(Fusion):
    supports_slice = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.fc = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        parts = self.slice(features)
        return sum(parts[m] for m in self.modalities)  # type: ignore[return-value]

    def slice(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.fc[m](features[m]) for m in self.modalities}
