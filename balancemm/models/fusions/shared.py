"""Shared-head fusion: one classifier head H applied to every modality, z = Σ_m H(h_m).

Used by methods whose unimodal learners share their last layers: ReconBoost (the "common space"
head H: Linear(d, 256) → ReLU → Linear(256, C), ``hidden=256``) and MLA (a shared linear head,
``hidden=0``). The per-modality logits are exactly H(h_m), so the fusion is sliceable.
"""

from __future__ import annotations

from torch import Tensor, nn

from balancemm.errors import ConfigError
from balancemm.models.fusions.base import Fusion
from balancemm.registry import FUSIONS


@FUSIONS.register("shared")
class SharedHeadFusion(Fusion):
    supports_slice = True

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 0) -> None:
        super().__init__(dims, num_classes)
        sizes = set(dims.values())
        if len(sizes) != 1:
            listed = ", ".join(f"{m}={d}" for m, d in sorted(dims.items()))
            raise ConfigError(
                f"fusion 'shared' applies one head to every modality, so all encoders must output the same "
                f"feature size (got {listed}); configure the encoders to equal output sizes"
            )
        (dim,) = sizes
        self.head: nn.Module = (
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
            if hidden > 0
            else nn.Linear(dim, num_classes)
        )

    @property
    def linear_head(self) -> nn.Linear | None:
        """H when it is one linear layer (``hidden=0``), weight ``[C, d]`` and bias ``[C]``; None when H
        has a hidden layer."""
        return self.head if isinstance(self.head, nn.Linear) else None

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        parts = self.slice(features)
        return sum((parts[m] for m in self.modalities[1:]), parts[self.modalities[0]])

    def slice(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{m: H(h_m)}``, each ``[B, C]``, for whichever modalities ``features`` holds (ReconBoost
        evaluates a subset of its learners)."""
        return {m: self.head(h) for m, h in features.items()}
